"""Contract tests parametrized over every registered quantizer (add it to QUANTIZERS: it is covered)."""
import copy

import pytest
import torch
from torch import nn

from diffq_bench.io import LoadError
from diffq_bench.quant import QUANTIZERS, QuantizerError, deserialize, get_quantizer, restore, serialize
from diffq_bench.quant.state import load, save

NAMES = sorted(QUANTIZERS)


class Zoo(nn.Module):
    """Every weight kind the quantizers must handle, with the output layer tied to the embedding."""

    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv1 = nn.Conv1d(dim, dim, 3, padding=1)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)  # 36 weights: a remainder group at g=16
        self.out = nn.Linear(dim, vocab)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        x = self.conv1(x.transpose(1, 2)).transpose(1, 2)
        x, _ = self.lstm(x)
        x, _ = self.attn(x, x, x, need_weights=False)
        x = self.conv2(x.unsqueeze(1)).mean(1)
        return self.out(x)


def make(name, calibrate=True):
    """Model + quantizer after one train forward (methods with activation ranges calibrate then)."""
    torch.manual_seed(0)
    model = Zoo()
    quantizer = get_quantizer(name, model, min_size=0)
    if calibrate:
        model(tokens()).sum().backward()
        model.zero_grad()
    return model, quantizer


def tokens():
    return torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))


def test_unknown_name_lists_valid():
    with pytest.raises(QuantizerError, match="diffq"):
        get_quantizer("nope", nn.Linear(2, 2))


def test_bad_keyword_lists_valid():
    with pytest.raises(QuantizerError, match="min_size"):
        get_quantizer("none", nn.Linear(2, 2), bogus=1)


@pytest.mark.parametrize("name", NAMES)
def test_train_forward_leaves_float_weights_untouched(name):
    model, quantizer = make(name, calibrate=False)
    before = copy.deepcopy(model.state_dict())
    model.train()
    for _ in range(2):
        loss = model(tokens()).square().mean() + quantizer.penalty_term()
        loss.backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.out.weight is model.emb.weight  # tying survives
    # every trainable weight got a gradient through the substituted value
    assert model.conv1.weight.grad is not None and model.lstm.weight_hh_l0.grad is not None


@pytest.mark.parametrize("name", NAMES)
def test_eval_output_equals_restored_output(name):
    model, quantizer = make(name)
    model.eval()
    with torch.no_grad():
        expected = model(tokens())
        again = model(tokens())  # cached eval weights give the same result
    assert torch.equal(expected, again)
    state = quantizer.export()
    quantizer.detach()
    torch.manual_seed(123)
    fresh = Zoo().eval()
    restore(fresh, deserialize(serialize(state)))
    with torch.no_grad():
        assert torch.equal(fresh(tokens()), expected)


@pytest.mark.parametrize("name", NAMES)
def test_true_size_matches_file_and_roundtrip(name, tmp_path):
    model, quantizer = make(name)
    model.eval()
    with torch.no_grad():
        expected = model(tokens())
    path = tmp_path / "q.th"
    save(path, quantizer.export())
    assert path.stat().st_size == quantizer.true_size_bytes()
    state = load(path)
    assert state["version"] >= 1 and state["method"] == name
    quantizer.detach()
    fresh = restore(Zoo().eval(), state)
    with torch.no_grad():
        assert torch.equal(fresh(tokens()), expected)


@pytest.mark.parametrize("name", NAMES)
def test_tied_weight_counted_once(name):
    model, quantizer = make(name)
    state = quantizer.export()
    names = set(state["quantized"]) | set(state["float"])
    assert "emb.weight" in names and "out.weight" not in names
    assert state["tied"]["out.weight"] == "emb.weight"
    untied = Zoo()
    untied.out.weight = nn.Parameter(untied.emb.weight.detach().clone())
    other = get_quantizer(name, untied, min_size=0)
    assert quantizer.true_model_size() < other.true_model_size()


@pytest.mark.parametrize("name", NAMES)
def test_size_and_penalty_api(name):
    model, quantizer = make(name)
    size = quantizer.model_size()
    assert isinstance(size, torch.Tensor) and size.dim() == 0 and float(size.detach()) > 0
    assert quantizer.true_model_size() > 0
    penalty = quantizer.penalty_term()
    assert isinstance(penalty, torch.Tensor) and float(penalty.detach()) >= 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    extra = quantizer.setup_optimizer(opt)
    assert isinstance(extra, list)
    assert 0 <= quantizer.bits_per_weight() <= 32
    assert (quantizer.bits_per_weight() > 0) == bool(quantizer.qparams)


@pytest.mark.parametrize("name", NAMES)
def test_restore_into_wrong_shapes_is_clear(name):
    model, quantizer = make(name)
    state = quantizer.export()
    with pytest.raises(QuantizerError, match="shape mismatch|lacks"):
        restore(Zoo(vocab=60), state)
    with pytest.raises(QuantizerError, match="lacks"):
        restore(nn.Linear(3, 3), state)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "none"])  # none stores weights as they are
def test_nan_weight_is_named(name):
    model, quantizer = make(name)
    with torch.no_grad():
        model.conv1.weight[0, 0, 0] = float("nan")
    with pytest.raises(QuantizerError, match="conv1.weight"):
        quantizer.export()


@pytest.mark.parametrize("name", NAMES)
def test_quantizer_state_dict_roundtrip(name):
    model, quantizer = make(name)
    state = quantizer.state_dict()
    buffer = serialize({"format": "diffq-bench/quantized-state", "version": 1, "q": state})
    loaded = deserialize(buffer)["q"]
    _, other = make(name)
    other.load_state_dict(loaded)
    assert len(other.quantizer_parameters()) == len(quantizer.quantizer_parameters())


def test_restore_rejects_foreign_states():
    with pytest.raises(QuantizerError, match="format"):
        restore(nn.Linear(2, 2), {"method": "none"})
    with pytest.raises(LoadError, match="corrupt or unreadable"):
        restore(nn.Linear(2, 2), b"garbage")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_eval_equals_restore(name):
    torch.manual_seed(0)
    model = Zoo().cuda()
    quantizer = get_quantizer(name, model, min_size=0)
    model.eval()
    x = tokens().cuda()
    with torch.no_grad():
        expected = model(x)
    state = quantizer.export()
    quantizer.detach()
    fresh = restore(Zoo().cuda().eval(), state)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("name", ["diffq", "lsq"])
def test_failed_construction_leaves_no_hooks(name):
    model = nn.Sequential(nn.Linear(7, 7), nn.Linear(7, 3))  # 49 and 21 weights
    if name == "lsq":
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
        kwargs = {}
    else:
        kwargs = {"group_size": 16}
    with pytest.raises(QuantizerError, match="0.weight|divides none"):
        get_quantizer(name, model, min_size=0, **kwargs)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
