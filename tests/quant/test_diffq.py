"""DiffQ properties: noise statistics, size accounting and its gradient, init, export exactness."""
import math

import pytest
import torch
from torch import nn

from diffq_bench.quant import DiffQuantizer, QuantizerError, get_quantizer, pack, restore
from diffq_bench.quant.base import MB
from diffq_bench.quant.diffq import grouped_dequantize, grouped_levels


def linear(n_in=64, n_out=64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def noise_of(quantizer, model):
    qp = quantizer.qparams[0]
    model.train()
    with torch.no_grad():
        return (quantizer._train_value(qp) - qp.param).reshape(-1), qp


@pytest.mark.parametrize("noise,factor", [("gaussian", 0.5), ("uniform", 1 / math.sqrt(12))])
def test_noise_std_matches_delta(noise, factor):
    model = linear(256, 256)
    q = get_quantizer("diffq", model, group_size=0, noise=noise, init_bits=4, min_size=0,
                      exclude=["bias"])
    eps, qp = noise_of(q, model)
    w = qp.param.detach()
    delta = float(w.max() - w.min()) / (2 ** 4 - 1)
    # 65536 samples: the std estimate is within ~1% (4 sigma) of the truth
    assert float(eps.std()) == pytest.approx(factor * delta, rel=0.02)
    assert abs(float(eps.mean())) < 0.02 * delta
    if noise == "uniform":
        assert float(eps.abs().max()) <= delta / 2 * (1 + 1e-5)


def test_noise_follows_per_group_bits():
    model = linear(256, 256)
    q = get_quantizer("diffq", model, group_size=16, min_size=0, exclude=["bias"])
    qp = q.qparams[0]
    with torch.no_grad():
        q.logits[qp.name].uniform_(-3, 3)
    eps, _ = noise_of(q, model)
    w = qp.param.detach()
    delta = (w.max() - w.min()) / (2 ** q.get_bits(qp).detach() - 1)
    normalized = eps.view(-1, 16) / delta[:, None]
    assert float(normalized.std()) == pytest.approx(0.5, rel=0.02)


def test_fresh_noise_each_forward_and_eval_is_deterministic():
    model = linear()
    q = get_quantizer("diffq", model, min_size=0)
    a, _ = noise_of(q, model)
    b, _ = noise_of(q, model)
    assert not torch.equal(a, b)
    model.eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_init_bits_exact():
    model = linear()
    q = get_quantizer("diffq", model, min_size=0, init_bits=5, min_bits=2, max_bits=10)
    for qp in q.qparams:
        assert torch.allclose(q.get_bits(qp), torch.full_like(q.get_bits(qp), 5.0), atol=1e-5)
        assert torch.equal(q.eval_bits(qp), torch.full_like(q.eval_bits(qp), 5))


def test_model_size_hand_computed():
    torch.manual_seed(0)
    # 8192 weights quantized (> 0.01 MiB = 2621.44 floats); bias 64, weight 640, bias 10 float
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    q = get_quantizer("diffq", model, group_size=16)
    assert [qp.name for qp in q.qparams] == ["0.weight"]
    bits_bits = 3  # per tensor, as the official package: ceil(log2(1 + round(max bits = 8) - 2))
    expected = 8192 * 8 + 2 * 32 + 8 + bits_bits * 512 + 32 * (64 + 640 + 10)
    assert float(q.model_size().detach()) == pytest.approx(expected / 8 / MB, rel=1e-6)
    assert q.true_model_size() == pytest.approx(expected / 8 / MB, rel=1e-9)
    q16 = get_quantizer("diffq", model, group_size=16, float16=True)
    expected16 = expected - 16 * (64 + 640 + 10)
    assert q16.true_model_size() == pytest.approx(expected16 / 8 / MB, rel=1e-9)


@pytest.mark.parametrize("group_size", [0, 1, 8, 16])
def test_model_size_uses_the_per_tensor_bits_of_bits_rule(group_size):
    """Size as the official package computes it: the bits storing each group's width follow the
    largest width the tensor has now, ``ceil(log2(1 + round(max bits) - min_bits))``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.Linear(24, 8))  # 768 and 192 weights
    q = get_quantizer("diffq", model, group_size=group_size, min_size=0, exclude=["bias"])
    tops = {"0.weight": 5.0, "1.weight": 12.6}  # round(max bits): 5 and 13
    expected = 32 * (24 + 8)  # the float biases
    expected_exact = expected
    for qp in q.qparams:
        logit = q.logits[qp.name]
        n, groups = qp.param.numel(), len(logit)
        g = group_size or n
        with torch.no_grad():  # bits from the tensor's top down to 2.5, as logits
            bits = torch.linspace(tops[qp.name], 2.5, groups)
            logit.copy_(torch.logit((bits - 2) / 13))
        bits = q.get_bits(qp).detach()
        assert round(float(bits.max())) == round(tops[qp.name])
        bits_bits = math.ceil(math.log2(1 + round(float(bits.max())) - 2))  # 3 and 4
        lengths = torch.full((groups,), float(g))
        lengths[-1] = n - g * (groups - 1)
        expected += float((lengths * bits).sum()) + 64 + 8 + bits_bits * groups
        expected_exact += float((lengths * bits.round()).sum()) + 64 + 8 + bits_bits * groups
        assert q.bits_bits(qp) == bits_bits
        # the export stores the widths at that per-tensor width
        entry = q.export()["quantized"][qp.name]
        assert entry["bits_bits"] == bits_bits and entry["bits"].numel() == math.ceil(groups * bits_bits / 8)
    assert float(q.model_size().detach()) == pytest.approx(expected / 8 / MB, rel=1e-6)
    assert q.true_model_size() == pytest.approx(expected_exact / 8 / MB, rel=1e-9)


def test_model_size_gradient_is_analytic_with_remainder_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.Linear(40, 19))  # 800 and 760 = 47*16 + 8
    q = get_quantizer("diffq", model, group_size=16, min_size=0, exclude=["*bias"])
    for logit in q.quantizer_parameters():
        with torch.no_grad():
            logit.normal_()
    q.model_size().backward()
    span = q.max_bits - q.min_bits
    for qp in q.qparams:
        logit = q.logits[qp.name]
        sig = torch.sigmoid(logit.detach())
        lengths = torch.full_like(sig, 16.0)
        lengths[-1] = qp.param.numel() - 16 * (len(sig) - 1)
        analytic = lengths * span * sig * (1 - sig) / 8 / MB
        assert torch.allclose(q.logit.grad[q.logit_slice(qp)], analytic, rtol=1e-5, atol=0)
    assert len(q.logits["1.weight"]) == 48


def test_penalty_term_is_lambda_times_size():
    model = linear()
    q = get_quantizer("diffq", model, min_size=0, penalty=3.0)
    assert torch.allclose(q.penalty_term(), 3.0 * q.model_size())
    assert float(get_quantizer("diffq", linear(), min_size=0).penalty_term().detach()) == 0.0


def test_custom_backward_matches_autograd_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.Linear(40, 19))
    q = get_quantizer("diffq", model, group_size=16, min_size=0, exclude=["*bias"])
    for qp in q.qparams:
        logit = q.logits[qp.name]
        with torch.no_grad():
            logit.normal_()
        u = torch.randn(qp.param.numel())
        out = q._train_value(qp, fixed_noise=u)
        gout = torch.randn_like(out)
        got = torch.autograd.grad((out * gout).sum(), [qp.param, q.logit])  # the flat logits
        w = qp.param
        bits = q.get_bits(qp).repeat_interleave(16)[:w.numel()]
        reference = w + ((w.max() - w.min()) / (2 ** bits - 1) / 2 * u).view_as(w)
        assert torch.allclose(reference, out, atol=1e-6)
        want = torch.autograd.grad((reference * gout).sum(), [w, q.logit])
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_large_penalty_lowers_bits():
    model = linear()
    q = get_quantizer("diffq", model, min_size=0, penalty=1e4)
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    q.setup_optimizer(opt, lr=0.1)
    assert opt.param_groups[-1]["weight_decay"] == 0.0 and opt.param_groups[-1]["lr"] == 0.1
    before = q.bits_per_weight()
    for _ in range(5):
        opt.zero_grad()
        (model(torch.randn(8, 64)).square().mean() + q.penalty_term()).backward()
        opt.step()
    assert q.bits_per_weight() < before


def test_separate_adam():
    model = linear()
    q = get_quantizer("diffq", model, min_size=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    extra = q.setup_optimizer(opt, separate_adam=True)
    assert len(opt.param_groups) == 1 and len(extra) == 1
    assert isinstance(extra[0], torch.optim.Adam) and extra[0].defaults["lr"] == 1e-3


@pytest.mark.parametrize("kwargs", [
    dict(group_size=0), dict(group_size=1), dict(group_size=16, noise="uniform"),
    dict(min_bits=2.5, max_bits=7.5, init_bits=5), dict(min_bits=1, max_bits=16, init_bits=8)])
def test_export_exact_over_widths(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.Linear(40, 19))  # 760 weights: remainder at 16
    q = get_quantizer("diffq", model, min_size=0, **kwargs)
    with torch.no_grad():
        for logit in q.quantizer_parameters():
            logit.uniform_(-8, 8)  # every width from min to max, 15 and 16 bits included
    model.eval()
    x = torch.randn(5, 48)
    with torch.no_grad():
        expected = model(x)
    widths = torch.cat([q.eval_bits(qp) for qp in q.qparams])
    top = round(kwargs.get("max_bits", 15))  # bits < max_bits, so round(bits) may stop one short
    assert top - 1 <= int(widths.max()) <= top
    state = q.export()
    q.detach()
    fresh = restore(nn.Sequential(nn.Linear(48, 40), nn.Linear(40, 19)).eval(), state)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    # true size: the analytic bits plus a bounded serialization overhead
    assert q.true_size_bytes() * 8 >= q.true_model_size() * 8 * MB * 0.99


@pytest.mark.parametrize("group_size", [0, 8, 16, 24])
def test_restored_weights_are_the_eval_weights_bit_for_bit(monkeypatch, group_size):
    # the export packs (and restore unpacks) in slices of whole groups, computing the levels and the
    # dequantized weights slice by slice: the result must be the eval weights exactly, every width
    monkeypatch.setattr(pack, "_SLICE_VALUES", 96)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(48, 40), nn.Linear(40, 19))  # 1920 and 760 weights
    q = get_quantizer("diffq", model, group_size=group_size, min_size=0, min_bits=1, max_bits=16,
                      init_bits=8)
    with torch.no_grad():
        for logit in q.quantizer_parameters():
            logit.uniform_(-8, 8)
    expected = {qp.name: q._eval_value(qp) for qp in q.qparams}
    fresh = restore(nn.Sequential(nn.Linear(48, 40), nn.Linear(40, 19)), q.export())
    restored = dict(fresh.named_parameters())
    for name, value in expected.items():
        assert torch.equal(restored[name], value), name


@pytest.mark.parametrize("group_size", [0, 1, 16, 24])
def test_grouped_arithmetic_is_the_formula_entry_by_entry(group_size):
    # the in-place group arithmetic (eval, export and restore share it) against the formula
    # written entry by entry with each entry's own bit width (float32, the same operation order)
    torch.manual_seed(2)
    weight = torch.randn(1000) * 3
    g = group_size or 1000
    bits = torch.randint(1, 17, (-(-1000 // g),))
    low, high = float(weight.min()), float(weight.max())
    steps = (torch.exp2(bits.float()) - 1).repeat_interleave(g)[:1000]
    expected = torch.minimum(torch.round((weight - low) / (high - low) * steps).clamp(min=0), steps)
    levels = grouped_levels(weight, bits, low, high, group_size)
    assert levels.dtype == torch.int32 and torch.equal(levels, expected.to(torch.int32))
    step = (torch.tensor(high - low, dtype=torch.float32) / (torch.exp2(bits.float()) - 1)).repeat_interleave(g)[:1000]
    dequantized = levels * step + torch.tensor(low, dtype=torch.float32)
    assert torch.equal(grouped_dequantize(levels, bits, low, high, group_size), dequantized)
    out = torch.empty(1000)
    assert grouped_dequantize(levels, bits, low, high, group_size, out=out) is out
    assert torch.equal(out, dequantized)
    constant = torch.full((64,), 0.5)
    assert torch.equal(grouped_levels(constant, bits[:4], 0.5, 0.5, 16), torch.zeros(64, dtype=torch.int32))


def test_corrupt_levels_are_a_quantizer_error():
    model = linear()
    q = get_quantizer("diffq", model, group_size=16, min_size=0)
    with torch.no_grad():
        q.quantizer_parameters()[0].uniform_(-4, 4)
    state = q.export()
    entry = state["quantized"]["weight"]
    entry["levels"] = entry["levels"][:-3]
    with pytest.raises(QuantizerError, match="DiffQ levels: .*truncated or corrupt"):
        restore(linear(), state)


def test_eval_weight_is_truly_quantized():
    model = linear()
    q = get_quantizer("diffq", model, group_size=0, min_size=0, init_bits=3, exclude=["bias"])
    qp = q.qparams[0]
    value = q._eval_value(qp)
    assert value.unique().numel() <= 8
    w = qp.param.detach()
    assert float(value.min()) == float(w.min()) and float(value.max()) == float(w.max())


@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=-1), "group_size"),
    (dict(group_size=1.5), "group_size"),
    (dict(group_size=7), "divides none"),
    (dict(penalty=-1), "penalty"),
    (dict(min_bits=8, max_bits=8), "min_bits must be < max_bits"),
    (dict(min_bits=0), r"min_bits must be a finite number in \[1, 16\]"),
    (dict(max_bits=17), r"max_bits must be a finite number in \[1, 16\]"),
    (dict(init_bits=15), "strictly between"),
    (dict(noise="laplace"), "gaussian"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(QuantizerError, match=match):
        get_quantizer("diffq", linear(), min_size=0, **kwargs)
    assert issubclass(QuantizerError, ValueError)


def test_nan_logit_is_named():
    model = linear()
    q = get_quantizer("diffq", model, min_size=0)
    with torch.no_grad():
        q.logits["weight"][3] = float("nan")
    with pytest.raises(QuantizerError, match="weight"):
        q.export()
    with pytest.raises(QuantizerError, match="weight"):
        q.true_model_size()


def test_tied_parameters_counted_once():
    emb = nn.Embedding(100, 32)
    head = nn.Linear(32, 100, bias=False)
    head.weight = emb.weight
    tied = nn.ModuleDict({"emb": emb, "head": head})
    q = get_quantizer("diffq", tied, min_size=0)
    assert len(q.qparams) == 1 and len(q.quantizer_parameters()) == 1
    single = get_quantizer("diffq", nn.Embedding(100, 32), min_size=0)
    assert q.true_model_size() == pytest.approx(single.true_model_size())


def test_state_dict_restores_logits():
    model = linear()
    q = get_quantizer("diffq", model, min_size=0)
    with torch.no_grad():
        q.logits["weight"].fill_(-1.0)
    other = DiffQuantizer(linear(), min_size=0)
    other.load_state_dict(q.state_dict())
    assert torch.equal(other.logits["weight"], q.logits["weight"])


def test_float16_and_exclude_roundtrip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    q = get_quantizer("diffq", model, min_size=0, float16=True, exclude=["2.*", "*.bias"])
    assert [qp.name for qp in q.qparams] == ["0.weight"]
    state = q.export()
    assert all(t.dtype == torch.float16 for t in state["float"].values())
    model.eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
    q.detach()
    fresh = restore(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval(), state)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_parallel_noise_fill_is_seeded_and_thread_count_independent():
    from diffq_bench.quant import rng as noise
    n = 2 * noise.CHUNK + 123  # three chunks, the last one short
    threads = torch.get_num_threads()
    draws = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            torch.manual_seed(7)
            draws.append(noise.fill_noise(torch.empty(n), "gaussian").clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    torch.manual_seed(8)
    other = noise.fill_noise(torch.empty(n), "gaussian")
    assert not torch.equal(other, draws[0])  # the global seed decides the noise
    z = draws[0]
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    # chunks are independent streams, not copies of one another
    c = noise.CHUNK
    assert abs(float(torch.corrcoef(torch.stack([z[:c], z[c:2 * c]]))[0, 1])) < 0.01
    u = noise.fill_noise(torch.empty(n), "uniform")
    assert float(u.min()) >= -0.5 and float(u.max()) <= 0.5 and abs(float(u.std()) - 12 ** -0.5) < 0.01
    with pytest.raises(ValueError, match="gaussian, uniform"):
        noise.fill_noise(torch.empty(n), "laplace")
