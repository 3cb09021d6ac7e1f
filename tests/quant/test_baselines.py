"""QAT/STE (integer and fractional bits) and LSQ (step init, gradient scale, positivity)."""
import math

import pytest
import torch
from torch import nn

from diffq_bench.quant import LSQQuantizer, QuantizerError, UniformQuantizer, get_quantizer, restore


def linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(64, 64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qat_levels_and_ste(bits):
    model = linear()
    q = get_quantizer("qat", model, bits=bits, min_size=0, exclude=["bias"])
    qp = q.qparams[0]
    value = q._eval_value(qp)
    assert value.unique().numel() <= 2 ** bits
    w = qp.param.detach()
    step = float(w.max() - w.min()) / (2 ** bits - 1)
    assert float((value - w).abs().max()) <= step / 2 * (1 + 1e-4)
    model.train()
    train_value = q._train_value(qp)
    assert torch.equal(train_value.detach(), value)
    (train_value * 3).sum().backward()
    assert torch.equal(qp.param.grad, torch.full_like(w, 3.0))  # straight-through


def test_qat_fractional_bits_mixed_radix():
    model = linear()
    q = get_quantizer("qat", model, bits=math.log2(3), min_size=0, exclude=["bias"])
    qp = q.qparams[0]
    assert q.levels == 3 and q._eval_value(qp).unique().numel() <= 3
    numel = qp.param.numel()
    assert float(q._param_bits(qp)) == pytest.approx(numel * math.log2(3) + 64)
    entry = q.export()["quantized"]["weight"]
    assert entry["levels"].numel() * 8 <= numel * math.log2(3) * 1.01 + 64
    model.eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    q.detach()
    fresh = restore(linear(1).eval(), q.export())
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("bits", [0.5, 17, "4"])
def test_qat_bad_bits(bits):
    with pytest.raises(QuantizerError, match=r"bits must be .*\[1, 16\]"):
        get_quantizer("qat", linear(), bits=bits)


def test_lsq_init_and_levels():
    model = linear()
    q = get_quantizer("lsq", model, bits=4, min_size=0, exclude=["bias"])
    qp = q.qparams[0]
    w = qp.param.detach()
    assert float(q.steps["weight"].detach()) == pytest.approx(float(2 * w.abs().mean() / math.sqrt(7)), rel=1e-6)
    ratio = q._eval_value(qp) / q.steps["weight"].detach()
    assert torch.allclose(ratio, ratio.round(), atol=1e-4)
    assert float(ratio.min()) >= -8 - 1e-4 and float(ratio.max()) <= 7 + 1e-4
    assert float(q._param_bits(qp)) == 4 * w.numel() + 32


def test_lsq_step_gradient_is_scaled():
    model = linear()
    q = get_quantizer("lsq", model, bits=3, min_size=0, exclude=["bias"])
    qp = q.qparams[0]
    step = q.steps["weight"]
    gout = torch.randn(64, 64)
    (q._train_value(qp) * gout).sum().backward()
    # unscaled LSQ gradient of ŵ = round(clamp(w/s)) * s with respect to s
    s = float(step.detach())
    v = qp.param.detach() / s
    qn, qp_ = 4, 3
    inner = torch.where(v <= -qn, torch.full_like(v, -qn),
                        torch.where(v >= qp_, torch.full_like(v, qp_), v.round() - v))
    expected = (gout * inner).sum() / math.sqrt(qp.param.numel() * qp_)
    assert float(step.grad) == pytest.approx(float(expected), rel=1e-4)
    # weight gradient: straight through inside the range, zero where clipped
    inside = (v > -qn) & (v < qp_)
    assert torch.allclose(qp.param.grad[inside], gout[inside])
    assert torch.all(qp.param.grad[~inside] == 0)


def test_lsq_step_stays_positive():
    model = linear()
    q = get_quantizer("lsq", model, bits=4, min_size=0, exclude=["bias"])
    with torch.no_grad():
        q.steps["weight"].fill_(-0.5)
    qp = q.qparams[0]
    value = q._train_value(qp)
    assert torch.isfinite(value).all()
    value.sum().backward()
    assert q.steps["weight"].grad is not None and torch.isfinite(q.steps["weight"].grad).all()
    assert torch.isfinite(q._eval_value(qp)).all()


def test_lsq_uses_main_lr():
    model = linear()
    q = get_quantizer("lsq", model, min_size=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    q.setup_optimizer(opt)
    assert opt.param_groups[-1]["lr"] == 0.05 and opt.param_groups[-1]["weight_decay"] == 0.0


@pytest.mark.parametrize("bits", [1, 2.5, 17])
def test_lsq_bad_bits(bits):
    with pytest.raises(QuantizerError, match=r"\[2, 16\]"):
        get_quantizer("lsq", linear(), bits=bits)


@pytest.mark.parametrize("cls,bits", [(UniformQuantizer, 16), (LSQQuantizer, 16), (UniformQuantizer, 1)])
def test_extreme_widths_roundtrip(cls, bits):
    model = linear()
    q = cls(model, bits=bits, min_size=0)
    model.eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    state = q.export()
    q.detach()
    with torch.no_grad():
        assert torch.equal(restore(linear(1).eval(), state)(x), expected)
