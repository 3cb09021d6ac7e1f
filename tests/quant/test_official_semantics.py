"""Where our quantizers follow the official ``diffq`` package, and where they differ on purpose
(docs/quantizers.md, "Differences from the official package"): one test each."""
import pytest
import torch
from torch import nn

from diffq_bench.config import compose, to_container
from diffq_bench.quant import QUANTIZERS, get_quantizer, restore
from diffq_bench.tasks import TASKS
from diffq_bench.train import Trainer
from diffq_bench.xp import Xp

#: quantizers that take ``exclude`` (every one, through the base class)
EXCLUDING = sorted(n for n in QUANTIZERS if n != "none")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)


def small_transformer():
    torch.manual_seed(0)
    model = nn.Module()
    model.embed = nn.Embedding(50, 16)
    model.layers = nn.ModuleList([Block(), Block()])
    model.head = nn.Linear(16, 50)
    return model


# MultiheadAttention's packed projection is stored as attributes in_proj_weight / in_proj_bias:
# neither "bias" nor "weight" matches those names, so the official rule quantizes them.
WEIGHTS = {"embed.weight", "head.weight"} | {
    f"layers.{i}.{n}" for i in range(2) for n in ("attn.in_proj_weight", "attn.out_proj.weight",
                                                  "fc1.weight", "fc2.weight", "norm.weight")}
BIASES = {"head.bias"} | {f"layers.{i}.{n}" for i in range(2) for n in (
    "attn.in_proj_bias", "attn.out_proj.bias", "fc1.bias", "fc2.bias", "norm.bias")}
NO_BIAS = WEIGHTS | {"layers.0.attn.in_proj_bias", "layers.1.attn.in_proj_bias"}
NO_WEIGHT = BIASES | {"layers.0.attn.in_proj_weight", "layers.1.attn.in_proj_weight"}
NO_LAYER0 = {n for n in WEIGHTS | BIASES if not n.startswith("layers.0.")}


@pytest.mark.parametrize("pattern, kept", [(["bias"], NO_BIAS), (["weight"], NO_WEIGHT),
                                           (["layers.0.*"], NO_LAYER0)])
def test_exclude_matches_the_full_name_or_the_attribute_name(pattern, kept):
    model = small_transformer()
    q = get_quantizer("diffq", model, min_size=0, group_size=0, exclude=pattern)
    assert {qp.name for qp in q.qparams} == kept


@pytest.mark.parametrize("name", EXCLUDING)
def test_every_quantizer_excludes_biases_by_attribute_name(name):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    q = get_quantizer(name, model, min_size=0, exclude=["bias"])
    names = {qp.name for qp in q.qparams}
    assert names and not any(n.endswith(".bias") for n in names), names
    q.detach()


def _trainer(compose_toy, *overrides):
    cfg = compose_toy("quant=diffq", "lambda=1000", "train.clip_grad=0.05", *overrides)
    plain = to_container(cfg)
    task = TASKS["toy"](**{k: v for k, v in plain["task"].items() if k != "name"})
    task.setup(plain["paths"]["data"], plain["paths"]["cache"], "cpu")
    xp = Xp(plain["paths"]["root"], cfg)
    xp.create()
    trainer = Trainer(plain, task, xp, torch.device("cpu"), {"progress": False})
    return trainer, task


def test_clipping_scales_logits_and_weights_together_as_the_official_recipe(compose_toy):
    trainer, task = _trainer(compose_toy, "quant.min_size=0")
    model, q = trainer.model, trainer.quantizer
    batch = task.train_batches(0)[0]
    model.train()
    loss, _ = task.step(model, batch)
    (loss + q.penalty_term()).backward()
    logits, weights = q.quantizer_parameters(), list(model.parameters())
    before = [p.grad.clone() for p in logits + weights]
    # official: logits are module parameters, clip_grad_norm_(model.parameters()) sees them
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in before]))
    assert total > 0.05  # the large penalty's gradient dominates the global norm
    clipped = trainer.clipped_parameters()
    assert {id(p) for p in clipped} == {id(p) for p in logits + weights}
    torch.nn.utils.clip_grad_norm_(clipped, 0.05)
    scale = 0.05 / (float(total) + 1e-6)
    for p, g in zip(logits + weights, before):
        torch.testing.assert_close(p.grad, g * scale)


def test_lm_recipe_keeps_the_logits_out_of_the_clip_norm(compose_toy):
    trainer, _ = _trainer(compose_toy, "train.clip_quantizer_params=false")
    ids = {id(p) for p in trainer.clipped_parameters()}
    assert ids == {id(p) for p in trainer.model.parameters()}


def test_tied_weight_has_one_logit_stepped_once():
    """Official lists a tied weight's logit once per owner, so Adam steps it twice; ours once."""
    emb = nn.Embedding(64, 32)
    head = nn.Linear(32, 64, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    q = get_quantizer("diffq", model, min_size=0, group_size=0)
    (logit,) = q.quantizer_parameters()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    (adam,) = q.setup_optimizer(opt, lr=0.1, separate_adam=True)
    before = logit.detach().clone()
    (1000 * q.model_size()).backward()
    adam.step()
    # Adam's first step moves each parameter by lr (sign of the gradient): once, not twice
    torch.testing.assert_close((before - logit.detach()).abs(), torch.full_like(before, 0.1))


def test_float16_substitutes_a_half_copy_at_eval_and_keeps_the_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    get_quantizer("diffq", model, min_size=1.0, float16=True)  # everything stays float
    weight = model[0].weight
    with torch.no_grad():
        weight[0, 0] = 1 + 2 ** -20  # not representable in float16
    kept = weight.detach().clone()
    x = torch.randn(3, 8)
    model.eval()
    with torch.no_grad():
        out = model(x)
        half_model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        half_model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        assert torch.equal(out, half_model(x))
    assert weight.dtype == torch.float32 and torch.equal(weight.detach(), kept)  # never rounded for good
    model.train()
    with torch.no_grad():
        assert torch.equal(model[0](x), nn.functional.linear(x, kept, model[0].bias))


def test_half_precision_model_exports_and_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8)).half()
    q = get_quantizer("diffq", model, min_size=0, group_size=8)
    model.eval()
    x = torch.randn(2, 32).half()
    with torch.no_grad():
        expected = model(x)
    state = q.export()
    q.detach()
    fresh = restore(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8)).half().eval(), state)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_fifteen_bit_groups_are_exported():
    """The official packer drops 15-bit groups; ours stores and restores them."""
    torch.manual_seed(0)
    model = nn.Linear(16, 16, bias=False)
    q = get_quantizer("diffq", model, min_size=0, group_size=16)
    with torch.no_grad():
        q.quantizer_parameters()[0].fill_(30.0)  # every group at max_bits = 15
    assert int(q.eval_bits(q.qparams[0]).min()) == 15
    model.eval()
    with torch.no_grad():
        expected = q._eval_value(q.qparams[0])
    state = q.export()
    q.detach()
    fresh = restore(nn.Linear(16, 16, bias=False), state)
    assert torch.equal(fresh.weight.detach(), expected)


def test_rounding_ties_go_to_the_even_level():
    """Levels are ``round`` of a float32 ratio; at an exact tie torch rounds half to even (the
    official package computes the same ratio in another order, so it may land on the other side)."""
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.5 / 3, 1.5 / 3, 1.0]]))  # 2 bits: levels 0, .5, 1.5, 3
    q = get_quantizer("diffq", model, min_size=0, group_size=0, min_bits=1.5, max_bits=2.5, init_bits=2)
    value = q._eval_value(q.qparams[0]).reshape(-1)
    ratios = model.weight.detach().reshape(-1) * 3
    assert torch.equal(value * 3, torch.round(ratios)), (value * 3, ratios)


def test_recipes_state_their_clipping_rule():
    assert compose(["task=wikitext103"]).train.clip_quantizer_params is False
    assert compose(["task=cifar10_resnet18"]).train.clip_quantizer_params is True
