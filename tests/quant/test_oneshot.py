"""One-shot MPQ: supernet (per-bit steps, per-pair BN), training step, scheduler, budgeted search."""
import inspect

import pytest
import torch
import yaml
from torch import nn

from diffq_bench.quant import QUANTIZERS, QuantizerError, deserialize, get_quantizer, restore, serialize
from diffq_bench.quant.base import Calibration
from diffq_bench.quant.oneshot import OneShotMPQQuantizer
from diffq_bench.quant.oneshot.bnpairs import SwitchableBN
from diffq_bench.tasks import Task


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


class _Task(Task):
    """Minimal classification task: step(model, batch) -> (CE loss, metrics)."""

    def step(self, model, batch):
        x, y = batch
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), {"acc": float((logits.argmax(-1) == y).float().mean())}


class _KLTask(_Task):
    calls = 0

    def distill_loss(self, student, teacher):
        type(self).calls += 1
        assert not teacher.requires_grad
        return nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                    reduction="batchmean")


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _quantizer(model, **kw):
    args = dict(bits=[2, 4, 6], act_bits=[4, 8], subnets=2, min_size=0, sched_every=0)
    args.update(kw)
    return OneShotMPQQuantizer(model, **args)


def test_supernet_structure():
    torch.manual_seed(0)
    model = _cnn()
    q = _quantizer(model)
    assert isinstance(model[1], SwitchableBN) and sorted(model[1].bns) == ["w2a4", "w2a8", "w4a4", "w4a8",
                                                                         "w6a4", "w6a8"]
    assert q.layers == ["0", "3", "7"] and q.active_config() == {n: (6, 8) for n in q.layers}
    assert all(qp.name.endswith("weight") or qp.name.endswith("bias") for qp in q.qparams)
    assert not any("bns" in qp.name for qp in q.qparams)  # BN params stay float
    assert len(q.quantizer_parameters()) == 4 * 3 + 3 * 2  # per-bit steps: 4 weight tensors, 3 inputs


def test_train_step_distils_and_reaches_sampled_pairs():
    torch.manual_seed(0)
    model = _cnn()
    q = _quantizer(model, bn_align=0.5)
    task = _KLTask()
    model.train()
    x, y = _data(1)[0]
    loss, metrics = q.train_step(task, model, (x, y))
    loss.backward()
    assert _KLTask.calls == 2 and {"acc", "mpq_kd", "mpq_sub_loss", "mpq_bn_align"} <= set(metrics)
    assert metrics["mpq_bn_align"] > 0
    assert q.active_config() == q.max_config()  # the resting configuration is restored
    grads = [p.grad is not None and float(p.grad.abs().sum()) > 0 for p in q.quantizer_parameters()]
    assert sum(grads) > 6  # steps of the max bits and of sampled lower bits got gradient
    trained_pairs = [k for k, bn in model[1].bns.items() if bn.weight.grad is not None]
    assert "w6a8" in trained_pairs and len(trained_pairs) >= 2


def test_training_reduces_loss_with_generic_mse_kd():
    torch.manual_seed(0)
    model = _cnn()
    q = _quantizer(model, subnets=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    q.setup_optimizer(opt)
    task, data = _Task(), _data(2)
    model.train()
    losses = []
    for _ in range(6):
        for batch in data:
            loss, metrics = q.train_step(task, model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert "mpq_kd" in metrics and sum(losses[-2:]) < sum(losses[:2])


def test_scheduler_freezes_turbulent_lowest_candidate():
    torch.manual_seed(0)
    model = _cnn()
    q = _quantizer(model, sched_every=2, sched_frac=0.3, turbulence_eps=0.1)
    turb = {n: q.turbulence(n, 2) for n in q.layers}
    assert all(0 <= t <= 1 for t in turb.values())
    model.train()
    for batch in _data(2):
        q.train_step(_Task(), model, batch)
    worst = max(turb, key=turb.get)
    assert q._frozen == {worst: [2]}
    for _ in range(30):
        assert q.sample_config()[worst][0] != 2
    other = OneShotMPQQuantizer(_cnn(), bits=[2, 4, 6], act_bits=[4, 8], min_size=0)
    other.load_state_dict(q.state_dict())
    assert other._frozen == q._frozen and other._steps_done == 2


@pytest.mark.parametrize("kind, budget", [("avg_bits", 3.0), ("avg_bitops", 20.0), ("size_mb", 0.0025)])
def test_search_meets_budget_and_exported_config_is_chosen(kind, budget):
    torch.manual_seed(0)
    model = _cnn()
    q = _quantizer(model, budget_kind=kind, budget=budget)
    task, data = _Task(), _data(3)
    model.train()
    for batch in data:  # a couple of steps so the BN pairs and MACs exist
        q.train_step(task, model, batch)
    assert q.cost(q.max_config()) > budget
    q.finalize(Calibration(task, data[:2]))
    chosen = q.active_config()
    assert q.cost(chosen) <= budget * (1 + 1e-9) and q.phase == "searched"
    state = deserialize(serialize(q.export()))
    assert state["mpq_config"] == {n: list(p) for n, p in chosen.items()}
    for name, entry in state["quantized"].items():
        assert entry["bits"] == chosen[name.rsplit(".", 1)[0]][0]
        assert entry["packed"].numel() == (entry["numel"] * entry["bits"] + 7) // 8
    for name, entry in state["activations"].items():
        assert entry["bits"] == chosen[name][1]
    x = data[2][0]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    fresh = _cnn().eval()  # plain BatchNorm: gets the chosen pair's weights and statistics
    restore(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    assert float(state["buffers"]["1.running_var"].mean()) != 1.0  # recalibrated, not the init


def test_search_picks_less_harmful_moves_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    q = OneShotMPQQuantizer(model, bits=[2, 4, 8], act_bits=[], min_size=0, budget_kind="avg_bits")
    x = torch.randn(64, 16)
    with torch.no_grad():
        ref = model(x)
    # error only cares about the last layer's precision: the search must cut the first one
    cfg = q.search(lambda m: float((m(x) - ref).pow(2).mean()) if q.active_config()["2"][0] < 8 else 0.0,
                   budget=5.0)
    assert cfg["2"][0] == 8 and cfg["0"][0] < 8 and q.cost(cfg) <= 5.0
    with pytest.raises(QuantizerError, match="budget"):
        q.search(lambda m: 0.0, budget=1.0)
    with pytest.raises(QuantizerError, match="calibration"):
        q.finalize(None)


@pytest.mark.parametrize("kwargs, match", [({"bits": []}, "bits"), ({"bits": [2, 17]}, "bits"),
                                           ({"act_bits": [0]}, "act_bits"), ({"budget_kind": "mb"}, "budget_kind"),
                                           ({"kd_weight": 2}, "kd_weight"), ({"subnets": -1}, "subnets")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(QuantizerError, match=match):
        OneShotMPQQuantizer(nn.Linear(8, 8), **kwargs)


def test_lstm_model_and_config_keys():
    torch.manual_seed(0)
    model = nn.LSTM(8, 8, batch_first=True)
    q = get_quantizer("oneshot_mpq", model, min_size=0)
    x = torch.randn(2, 5, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)[0]
    assert q.macs[""] == 5 * (4 * 8 * 8 * 2)
    restore(nn.LSTM(8, 8, batch_first=True), q.export())
    with open("conf/quant/oneshot_mpq.yaml") as f:
        cfg = yaml.safe_load(f)
    params = [p for p in inspect.signature(QUANTIZERS["oneshot_mpq"].__init__).parameters
              if p not in ("self", "model")]
    assert sorted(k for k in cfg if k != "name") == sorted(params)
    fresh = nn.LSTM(8, 8, batch_first=True).eval()
    restore(fresh, q.export())
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], expected)
