"""DSQ: hard forward, soft gradient, learnable bounds/alpha, activations, exact export."""
import inspect
import math

import pytest
import torch
import yaml
from torch import nn

from diffq_bench.quant import QUANTIZERS, QuantizerError, deserialize, get_quantizer, restore, serialize
from diffq_bench.quant.actquant import dsq_alpha, dsq_dequantize, dsq_levels, dsq_quantize, dsq_rho, dsq_soft
from diffq_bench.quant.dsq import DSQQuantizer


def _soft_derivative(x, lower, upper, alpha, bits):
    """Closed-form d/dx of l + Δ(i + (s·tanh(k(x − m_i)) + 1)/2) inside (l, u), 0 outside."""
    delta = (upper - lower) / (2 ** bits - 1)
    index = torch.floor((x - lower) / delta).clamp(0, 2 ** bits - 2)
    centre = lower + (index + 0.5) * delta
    s = 1 / (1 - alpha)
    k = math.log(2 / alpha - 1) / delta
    d = delta / 2 * s * k * (1 - torch.tanh(k * (x - centre)) ** 2)
    return torch.where((x > lower) & (x < upper), d, torch.zeros_like(d))


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_forward_is_hard_quantization(bits):
    torch.manual_seed(0)
    x = torch.randn(4000) * 2
    lower, upper = torch.tensor(-1.5), torch.tensor(2.0)
    out = dsq_quantize(x, lower, upper, torch.tensor(0.2), bits)
    delta = (2.0 + 1.5) / (2 ** bits - 1)
    expected = -1.5 + delta * torch.round((x.clamp(-1.5, 2.0) + 1.5) / delta)
    assert torch.allclose(out, expected, atol=1e-6)
    assert len(torch.unique(out)) == 2 ** bits  # the requested bit width, all levels reached
    assert torch.equal(out, dsq_dequantize(dsq_levels(x, lower, upper, bits), lower, upper, bits))


@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.45])
def test_gradient_is_soft_derivative(alpha):
    torch.manual_seed(1)
    bits = 3
    x = (torch.rand(500) * 5 - 2).requires_grad_()  # some outside [-1, 2.5]: clipped
    lower, upper = torch.tensor(-1.0), torch.tensor(2.5)
    dsq_quantize(x, lower, upper, torch.tensor(alpha), bits).sum().backward()
    expected = _soft_derivative(x.detach(), -1.0, 2.5, alpha, bits)
    assert torch.allclose(x.grad, expected, rtol=1e-4, atol=1e-5)
    assert (x.grad[(x.detach() < -1) | (x.detach() > 2.5)] == 0).all()
    # the soft function approaches the hard step as alpha -> 0
    xs = torch.linspace(-0.9, 2.4, 101)
    hard = dsq_quantize(xs, lower, upper, torch.tensor(0.2), bits)
    gaps = [float((dsq_soft(xs, lower, upper, torch.tensor(a), bits) - hard).abs().mean())
            for a in (0.4, 0.2, 0.01)]
    assert gaps[0] > gaps[1] > gaps[2]


def test_gradients_reach_bounds_and_alpha():
    x = torch.linspace(-3, 3, 301)
    lower = torch.tensor(-1.0, requires_grad=True)
    upper = torch.tensor(1.0, requires_grad=True)
    rho = torch.tensor(dsq_rho(0.2), requires_grad=True)
    (dsq_quantize(x, lower, upper, dsq_alpha(rho), 2) ** 2).sum().backward()
    for t in (lower, upper, rho):
        assert t.grad is not None and t.grad != 0
    assert 0 < float(dsq_alpha(torch.tensor(1e4))) < 0.5 and 0 < float(dsq_alpha(torch.tensor(-1e4)))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def test_quantizer_bits_first_last_and_activation_range():
    torch.manual_seed(0)
    model = _cnn()
    q = DSQQuantizer(model, bits=3, act_bits=4, first_last_bits=8, min_size=0)
    weights = [qp.name for qp in q.qparams]
    bits = q.bit_widths()
    assert bits[weights[0]] == 8 and bits[weights[-1]] == 8 and bits["3.weight"] == 3 and bits["1.weight"] == 3
    x = torch.randn(16, 1, 6, 6)
    model.train()
    seen = {}
    model[3].register_forward_pre_hook(lambda m, i: seen.setdefault("in", i[0].detach()))
    model(x)
    # the first batch initialised the input range of each layer, then the input was quantized
    assert float(q._astate["a_0_lower"].detach()) == float(x.min())
    assert float(q._astate["a_0_upper"].detach()) == float(x.max())
    assert len(torch.unique(seen["in"])) <= 2 ** 4
    # the requested widths are really used when packed
    state = q.export()
    assert state["quantized"]["3.weight"]["packed"].numel() == math.ceil(8 * 8 * 9 * 3 / 8)
    assert state["activations"]["3"]["bits"] == 4 and state["activations"]["0"]["bits"] == 8


def test_training_step_learns_and_export_restore_exact():
    torch.manual_seed(0)
    model = _cnn()
    q = get_quantizer("dsq", model, bits=2, act_bits=3, first_last_bits=None, min_size=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    q.setup_optimizer(opt, lr=0.01)
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 10, (64,))
    model.train()
    # bounds/alpha of the multi-dimensional weights and of every layer input
    learned = [p for k, p in q._wstate.items() if q.qparams[int(k.split("_")[0])].param.dim() > 1]
    learned += list(q._astate.values())
    before = [p.detach().clone() for p in learned]
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, learned)]
    assert len(moved) == 3 * 3 + 3 * 3 and all(moved)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    q.detach()
    fresh = _cnn().eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "running" in k or "tracked" in k},
                          strict=False)
    restore(fresh, deserialize(serialize(q.export())))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    # restoring twice does not stack activation hooks
    restore(fresh, q.export())
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_lstm_and_state_resume():
    torch.manual_seed(0)
    model = nn.LSTM(16, 16, batch_first=True)
    q = DSQQuantizer(model, bits=4, act_bits=4, first_last_bits=None, min_size=0)
    x = torch.randn(2, 5, 16)
    model.eval()
    with torch.no_grad():
        ref = model(x)[0]
    state = q.state_dict()
    other = nn.LSTM(16, 16, batch_first=True)
    other.load_state_dict(model.state_dict())
    q2 = DSQQuantizer(other, bits=4, act_bits=4, first_last_bits=None, min_size=0)
    q2.load_state_dict(state)
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(x)[0], ref)
    with pytest.raises(QuantizerError, match="activation"):
        q2.load_state_dict({**state, "act_init": []})


@pytest.mark.parametrize("kwargs, match", [({"bits": 0}, "bits"), ({"bits": 17}, "bits"),
                                           ({"act_bits": -1}, "act_bits"), ({"alpha_init": 0.5}, "alpha"),
                                           ({"first_last_bits": 2.5}, "first_last_bits")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(QuantizerError, match=match):
        DSQQuantizer(nn.Linear(8, 8), **kwargs)


def test_config_keys_match_constructor():
    with open("conf/quant/dsq.yaml") as f:
        cfg = yaml.safe_load(f)
    params = [p for p in inspect.signature(QUANTIZERS["dsq"].__init__).parameters if p not in ("self", "model")]
    assert sorted(k for k in cfg if k != "name") == sorted(params)
    assert cfg["name"] == "dsq"
