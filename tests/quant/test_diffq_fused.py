"""DiffQ's train-time work is done for all quantized tensors at once (one flat buffer, one noise
draw, one autograd node, one size term); these tests pin it to the per-tensor definitions."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from diffq_bench.quant import get_quantizer
from diffq_bench.quant.base import BaseQuantizer
from diffq_bench.quant.diffq import NOISES


def mixed_model(seed=0):
    """Tensors of sizes that are and are not multiples of 8, 16 and 256 (padding in the flat
    buffer, remainder groups), one all negative and one all positive (a padding of zeros would
    change their range)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 40), nn.Linear(40, 19), nn.Linear(19, 24), nn.Linear(24, 32))
    with torch.no_grad():
        model[2].weight.copy_(-model[2].weight.abs() - 0.1)
        model[3].weight.copy_(model[3].weight.abs() + 0.1)
    return model


def reference(q, qp, u):
    """The per-tensor definition: ``w + c · (max - min) / (2**bits_g - 1) · u`` by plain autograd."""
    w = qp.param
    n = w.numel()
    bits = q.get_bits(qp).repeat_interleave(q.group_size or n)[:n]
    return w + (NOISES[q.noise] * (w.max() - w.min()) / (2 ** bits - 1) * u.reshape(-1)).view_as(w)


def randomize_logits(q, low=-4.0, high=4.0):
    with torch.no_grad():
        for logit in q.quantizer_parameters():
            logit.uniform_(low, high)


@pytest.mark.parametrize("group_size,noise", [(0, "gaussian"), (1, "uniform"), (8, "gaussian"),
                                              (16, "gaussian"), (16, "uniform")])
def test_fused_forward_and_gradients_equal_per_tensor_reference(group_size, noise):
    model = mixed_model()
    q = get_quantizer("diffq", model, group_size=group_size, noise=noise, min_size=0, exclude=["*bias"])
    randomize_logits(q)
    qps = q.qparams
    assert [qp.param.numel() for qp in qps] == [1920, 760, 456, 768]
    u = [torch.randn_like(qp.param) for qp in qps]
    got = q.noisy_weights(qps, fixed_noise=u)
    want = [reference(q, qp, ui) for qp, ui in zip(qps, u)]
    gouts = [torch.randn_like(qp.param) for qp in qps]
    inputs = [qp.param for qp in qps] + q.quantizer_parameters()  # the logits: one flat parameter
    grads_got = torch.autograd.grad(sum((o * g).sum() for o, g in zip(got, gouts)), inputs)
    grads_want = torch.autograd.grad(sum((o * g).sum() for o, g in zip(want, gouts)), inputs)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=0)
    for a, b in zip(grads_got, grads_want):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("group_size", [0, 8, 16])
def test_set_equals_each_tensor_alone(group_size):
    """The forward of a tensor does not depend on which other tensors share its buffer (up to the
    last bit: vectorized and scalar loops may round differently at different offsets)."""
    model = mixed_model(1)
    q = get_quantizer("diffq", model, group_size=group_size, min_size=0)  # biases quantized too
    randomize_logits(q)
    qps = q.qparams
    u = [torch.randn_like(qp.param) for qp in qps]
    together = q.noisy_weights(qps, fixed_noise=u)
    for qp, ui, value in zip(qps, u, together):
        torch.testing.assert_close(q.noisy_weights([qp], fixed_noise=[ui])[0], value, rtol=1e-6, atol=1e-7)


def test_train_forward_sees_one_draw_for_the_subtree():
    """The hooks hand the whole set of a forward to one call: the weights a train forward sees are
    those of ``noisy_weights(qparams)`` with the same generator state; a direct call of a
    submodule draws for its own tensors only."""
    model = mixed_model()
    q = get_quantizer("diffq", model, min_size=0, exclude=["*bias"])
    model.train()
    x = torch.randn(5, 48)
    torch.manual_seed(3)
    got = model(x)
    torch.manual_seed(3)
    weights = q.noisy_weights(q.qparams)
    want = x
    for layer, weight in zip(model, weights):
        want = F.linear(want, weight, layer.bias)
    assert torch.equal(got, want)
    torch.manual_seed(4)
    alone = model[1](torch.ones(2, 40))
    torch.manual_seed(4)
    assert torch.equal(alone, F.linear(torch.ones(2, 40), q.noisy_weights([q.qparams[1]])[0], model[1].bias))


def test_noise_is_seeded_thread_count_independent_and_resumable():
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(1024, 700), nn.Linear(700, 900))  # 1.35M weights: chunked fill
    q = get_quantizer("diffq", big, min_size=0, exclude=["*bias"])
    threads = torch.get_num_threads()
    draws = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            torch.manual_seed(5)
            with torch.no_grad():
                draws.append(torch.cat([v.reshape(-1) for v in q.noisy_weights(q.qparams)]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[0], draws[1])
    state = torch.get_rng_state()  # a resumed run restores the generator: the same noise follows
    with torch.no_grad():
        first = [v.clone() for v in q.noisy_weights(q.qparams)]
        torch.set_rng_state(state)
        again = q.noisy_weights(q.qparams)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("group_size", [0, 1, 8, 16])
def test_one_size_term_equals_per_tensor_sum(group_size):
    model = mixed_model(2)
    q = get_quantizer("diffq", model, group_size=group_size, min_size=0, exclude=["0.bias"])
    with torch.no_grad():  # a different top width per tensor: a different bits_bits per tensor
        for i, qp in enumerate(q.qparams):
            q.logits[qp.name].uniform_(-6.0, -6.0 + 2.0 * i)
    assert len({q.bits_bits(qp) for qp in q.qparams}) >= 3
    fused = q.model_size()
    per_tensor = BaseQuantizer.model_size(q)  # Σ _param_bits(qp) over the tensors, one by one
    assert float(fused.detach()) == pytest.approx(float(per_tensor.detach()), rel=1e-6)
    logits = q.quantizer_parameters()
    for a, b in zip(torch.autograd.grad(fused, logits), torch.autograd.grad(per_tensor, logits)):
        assert torch.allclose(a, b, rtol=1e-5, atol=0)


def test_backward_twice_is_refused():
    model = mixed_model()
    q = get_quantizer("diffq", model, min_size=0)
    out = sum(v.sum() for v in q.noisy_weights(q.qparams))
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.backward()


def test_float64_model():
    model = mixed_model().double()
    q = get_quantizer("diffq", model, group_size=16, min_size=0, exclude=["*bias"])
    randomize_logits(q)
    qp = q.qparams[1]
    u = torch.randn_like(qp.param)
    got = q.noisy_weights([qp], fixed_noise=[u])[0]
    assert got.dtype == torch.float64
    assert torch.allclose(got, reference(q, qp, u), atol=1e-6, rtol=0)
    got.sum().backward()
    assert qp.param.grad.dtype == torch.float64 and q.logit.grad[q.logit_slice(qp)].abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = mixed_model()
    q = get_quantizer("diffq", model, group_size=16, min_size=0, exclude=["*bias"])
    randomize_logits(q)
    u = [torch.randn_like(qp.param) for qp in q.qparams]
    cpu = [v.detach() for v in q.noisy_weights(q.qparams, fixed_noise=u)]
    model.cuda()
    cuda = q.noisy_weights(q.qparams, fixed_noise=[x.cuda() for x in u])
    for a, b in zip(cpu, cuda):
        assert torch.allclose(a, b.detach().cpu(), atol=1e-6, rtol=0)
    sum(v.sum() for v in cuda).backward()
    assert all(qp.param.grad.is_cuda for qp in q.qparams)


def test_range_gradient_goes_to_the_first_argmax_and_argmin():
    """Ties of the max (min) inside one tensor, in different blocks of 256 entries: the gradient
    of the range goes to the first occurrence only (as torch.argmax), never to the padding."""
    model = mixed_model()
    q = get_quantizer("diffq", model, group_size=8, min_size=0, exclude=["*bias"])
    qps = q.qparams
    with torch.no_grad():
        for qp, (i, j) in zip(qps, [(700, 300), (5, 600), (455, 0), (767, 1)]):
            flat = qp.param.view(-1)
            flat[[i, j]] = flat.max() + 1  # two maxima
            flat[[j + 1, i - 1]] = flat.min() - 1  # two minima
    u = [torch.randn_like(qp.param) for qp in qps]
    values = q.noisy_weights(qps, fixed_noise=u)
    gouts = [torch.randn_like(v) for v in values]
    grads = torch.autograd.grad(sum((v * g).sum() for v, g in zip(values, gouts)), [qp.param for qp in qps])
    for qp, grad, gout in zip(qps, grads, gouts):
        moved = (grad - gout).view(-1)
        flat = qp.param.detach().view(-1)
        imax, imin = int(flat.argmax()), int(flat.argmin())
        assert moved.nonzero().view(-1).tolist() == sorted([imax, imin])
        assert float(moved[imax]) == pytest.approx(-float(moved[imin]), rel=1e-4)


def test_reused_buffers_never_alias_live_tensors():
    """The flat buffers are reused across steps only once nothing refers to them: values and
    gradients still held by the caller are never overwritten by a later forward or backward."""
    model = mixed_model()
    q = get_quantizer("diffq", model, group_size=16, min_size=0, exclude=["*bias"])
    qps = q.qparams
    first = q.noisy_weights(qps)
    kept = [v.detach().clone() for v in first]
    second = q.noisy_weights(qps)  # before any backward: fresh memory for the second set
    assert all(torch.equal(a, b) for a, b in zip(first, kept))
    assert not torch.equal(first[0], second[0])
    sum(v.sum() for v in first).backward()
    grads = [qp.param.grad.clone() for qp in qps]
    sum(v.sum() for v in second).backward()  # accumulates into the .grad the first one left
    for _ in range(3):  # the memory of dead steps comes back: still nothing live is touched
        sum(v.sum() for v in q.noisy_weights(qps)).backward()
    assert all(torch.equal(a, b) for a, b in zip(first, kept))
    assert all(not torch.equal(qp.param.grad, g) for qp, g in zip(qps, grads))
    assert all(torch.isfinite(qp.param.grad).all() for qp in qps)
    # gradients a caller still holds after .grad was reset (the weights' and the logits', the
    # size term's included) are never reused either
    tensors = [qp.param for qp in qps] + q.quantizer_parameters()
    held = [t.grad for t in tensors]
    copies = [g.clone() for g in held]
    for _ in range(3):
        for t in tensors:
            t.grad = None
        (sum(v.sum() for v in q.noisy_weights(qps)) + q.model_size()).backward()
    assert all(torch.equal(a, b) for a, b in zip(held, copies))


@pytest.mark.parametrize("main", ["adam", "sgd", "separate_adam"])
def test_logit_group_is_fused_with_the_same_update(main):
    """The logits' optimizer group (one flat tensor) uses the fused implementation by default; its
    update equals the multi-tensor and the per-tensor loops' up to float rounding."""
    results = []
    for choice in (None, {"foreach": True}, {"foreach": False}):
        model = mixed_model()
        q = get_quantizer("diffq", model, min_size=0, penalty=1.0)
        randomize_logits(q)
        opt = torch.optim.Adam(model.parameters()) if main == "adam" else torch.optim.SGD(model.parameters(), lr=0.1)
        extra = q.setup_optimizer(opt, separate_adam=main == "separate_adam", **(choice or {}))
        group = (extra[0] if extra else opt).param_groups[-1]
        if choice is None:
            assert group["fused"] is True and not group["foreach"]
        else:
            assert group["foreach"] is choice["foreach"] and not group["fused"]
        for _ in range(3):
            for o in [opt] + extra:
                o.zero_grad()
            torch.manual_seed(1)  # the same noise in every run
            (sum(v.square().sum() for v in q.noisy_weights(q.qparams)) + q.penalty_term()).backward()
            for o in [opt] + extra:
                o.step()
        results.append([p.detach().clone() for p in q.quantizer_parameters()])
    for other in results[1:]:
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(results[0], other))
