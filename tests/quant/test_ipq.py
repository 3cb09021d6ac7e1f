"""Quant-Noise + iPQ: block noise, k-means, staged quantization, export and size."""
import io
import math

import pytest
import torch
from torch import nn

from diffq_bench.quant import QuantizerError, deserialize, get_quantizer, restore, serialize
from diffq_bench.quant.ipq import QuantNoiseIPQQuantizer, block_dim, kmeans


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


# --------------------------------------------------------------------------------- k-means
def test_kmeans_error_decreases_and_is_seeded():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(300, 4) + 4 * torch.randn(1, 4) for _ in range(6)])
    for init in ("kmeans++", "random"):
        centroids, assign, errors = kmeans(x, 16, n_iter=15, init=init, seed=3)
        assert len(errors) >= 3
        assert all(b <= a * (1 + 1e-5) + 1e-7 for a, b in zip(errors, errors[1:])), errors
        assert errors[-1] < errors[0]
        # the reported error is the real one of the returned centroids/assignments
        assert errors[-1] == pytest.approx(float(((x - centroids[assign]) ** 2).sum(1).mean()), rel=1e-4)
        again = kmeans(x, 16, n_iter=15, init=init, seed=3)
        assert torch.equal(again[0], centroids) and torch.equal(again[1], assign)


def test_kmeans_reseeds_empty_clusters():
    # 3 distinct values, heavily duplicated: a random init almost surely picks equal points,
    # whose tied clusters come out empty; re-seeding must end with 3 live clusters, zero error.
    x = torch.tensor([[0.0, 0.0]] * 40 + [[5.0, 5.0]] * 40 + [[-5.0, 5.0]] * 40)
    for seed in range(5):
        centroids, assign, errors = kmeans(x, 3, n_iter=30, init="random", seed=seed)
        assert torch.bincount(assign, minlength=3).min() > 0
        assert errors[-1] == pytest.approx(0.0, abs=1e-6)


def test_kmeans_rejects_bad_input():
    with pytest.raises(QuantizerError):
        kmeans(torch.randn(4, 2), 5)
    with pytest.raises(QuantizerError):
        kmeans(torch.randn(4, 2), 2, init="nope")


# ------------------------------------------------------------------------------- layouts
def test_block_layouts_and_float_fallback():
    assert block_dim((16, 32), 8) == 8            # Linear: 8 consecutive input columns
    assert block_dim((16, 8, 3, 3), 8) == 9       # conv k×k: the whole kernel
    assert block_dim((16, 32, 1, 1), 8) == 8      # 1×1 conv: like Linear
    assert block_dim((16, 12), 8) is None         # in-features not divisible: stays float
    assert block_dim((16,), 8) is None
    model = nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 16), nn.Conv2d(2, 4, 3))
    quantizer = QuantNoiseIPQQuantizer(model, min_size=0)
    assert [qp.name for qp in quantizer.qparams] == ["1.weight", "2.weight"]
    assert "0.weight" in quantizer.skipped and "block_size" in quantizer.skipped["0.weight"]
    assert "0.weight" in quantizer.export()["float"]


# ----------------------------------------------------------------------------- block noise
def test_block_noise_drops_whole_blocks_at_rate_p_without_touching_weights():
    torch.manual_seed(0)
    model = nn.Linear(64, 512)
    quantizer = QuantNoiseIPQQuantizer(model, p=0.2, block_size=8, min_size=0)
    weight = model.weight.detach().clone()
    value = quantizer._train_value(quantizer.qparams[0]).detach().reshape(-1, 8)
    blocks = weight.reshape(-1, 8)
    dropped = (value == 0).all(1)
    assert torch.allclose(value[~dropped], blocks[~dropped] / 0.8)
    assert abs(float(dropped.float().mean()) - 0.2) < 0.02  # 4096 blocks: std ~0.006
    model.train()
    x = torch.randn(4, 64)
    for _ in range(5):
        model(x).sum().backward()
    assert torch.equal(model.weight.detach(), weight)
    assert bool((model.weight.grad != 0).all()), "straight-through: every weight gets a gradient"


def test_conv_noise_uses_kernels_as_blocks():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3)
    quantizer = QuantNoiseIPQQuantizer(conv, p=0.5, min_size=0)
    value = quantizer._train_value(quantizer.qparams[0]).detach().reshape(-1, 9)
    zero = value == 0
    assert torch.equal(zero.all(1), zero.any(1))  # a kernel is kept or dropped as a whole


# --------------------------------------------------------------------------------- size
def test_size_is_centroids_plus_log2k_over_block_bits_per_weight():
    model = nn.Linear(64, 256, bias=False)  # 2048 blocks of 8
    quantizer = QuantNoiseIPQQuantizer(model, n_centroids=256, block_size=8, min_size=0, n_iter=2)
    centroid_bits = 256 * 8 * 16
    assert quantizer.bits_per_weight() == pytest.approx((centroid_bits + 2048 * 8) / 16384)
    assert quantizer.bits_per_weight() - centroid_bits / 16384 == pytest.approx(math.log2(256) / 8)
    entry = quantizer.export()["quantized"]["weight"]
    assert entry["centroids"].dtype == torch.float16 and tuple(entry["centroids"].shape) == (256, 8)
    assert entry["assign"].dtype == torch.uint8 and entry["assign"].numel() == 2048
    # serialized size: payload plus torch.save's container (~1 KiB per tensor record, bounded)
    payload = centroid_bits // 8 + 2048
    assert payload < quantizer.true_size_bytes() < payload + 4096
    small = QuantNoiseIPQQuantizer(nn.Linear(64, 256, bias=False), n_centroids=16, min_size=0,
                                   n_iter=2)
    assert small.bits_per_weight() == pytest.approx((16 * 8 * 16 + 2048 * 4) / 16384)


# ------------------------------------------------------------------------------ phases
def test_schedule_quantizes_stage_by_stage_and_finetunes_centroids():
    model = _mlp()
    quantizer = get_quantizer("quant_noise_ipq", model, min_size=0, n_centroids=16, n_iter=5,
                              stages=[["2.*"], ["0.*"]], noise_frac=0.5)
    assert quantizer.stage_epochs(4) == [1, 2]
    assert [quantizer.stage_of(qp) for qp in quantizer.qparams] == [1, 0]
    assert quantizer.phase == "noise"
    assert not quantizer.on_epoch_end(0, 4)
    assert quantizer.on_epoch_end(1, 4) and quantizer.phase == "ipq:1/2"
    assert set(quantizer.centroids) == {"2.weight"} and not model[2].weight.requires_grad
    assert model[0].weight.requires_grad
    eval_before = quantizer._eval_value(quantizer.qparams[1]).clone()

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert quantizer.setup_optimizer(optimizer) == []
    centroids_before = quantizer.centroids["2.weight"].detach().clone()
    assign_before = quantizer.assignments["2.weight"].clone()
    model.train()
    loss = model(torch.randn(8, 32)).pow(2).mean()
    loss.backward()
    optimizer.step()
    assert not torch.equal(quantizer.centroids["2.weight"].detach(), centroids_before)
    assert torch.equal(quantizer.assignments["2.weight"], assign_before)
    assert torch.equal(quantizer._eval_value(quantizer.qparams[1]),
                       quantizer.centroids["2.weight"].detach().half().float()[assign_before]
                       .reshape(16, 64))
    assert not torch.equal(quantizer._eval_value(quantizer.qparams[1]), eval_before)

    assert quantizer.on_epoch_end(2, 4) and quantizer.phase == "ipq:2/2"
    assert not quantizer.on_epoch_end(3, 4) and not quantizer.finalize()

    # export after fine-tuning restores exactly; state_dict resumes the phase and centroids
    x = torch.randn(5, 32)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    state = quantizer.export()
    saved = quantizer.state_dict()
    quantizer.detach()
    fresh = _mlp(seed=1).eval()
    restore(fresh, deserialize(serialize(state)))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    resumed_model = _mlp(seed=2)
    resumed_model.load_state_dict(model.state_dict())
    resumed = get_quantizer("quant_noise_ipq", resumed_model, min_size=0, n_centroids=16, n_iter=5,
                            stages=[["2.*"], ["0.*"]])
    buf = io.BytesIO()
    torch.save(saved, buf)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert resumed.phase == "ipq:2/2" and len(resumed.quantizer_parameters()) == 2
    resumed_model.eval()
    with torch.no_grad():
        assert torch.equal(resumed_model(x), expected)


def test_eval_before_quantization_is_cached_until_the_weight_changes():
    model = _mlp()
    quantizer = QuantNoiseIPQQuantizer(model, min_size=0, n_centroids=8, n_iter=3)
    qp = quantizer.qparams[0]
    first = quantizer._eval_value(qp)
    key = quantizer._cache[qp.name][0]
    assert torch.equal(quantizer._eval_value(qp), first) and quantizer._cache[qp.name][0] == key
    assert first.unique().numel() <= 8 * 8
    with torch.no_grad():
        model[0].weight.mul_(2)
    assert not torch.equal(quantizer._eval_value(qp), first)
    assert quantizer._cache[qp.name][0] != key
    # finalize without any epoch hook quantizes everything, starting from the same k-means
    model[0].weight.data.div_(2)
    quantizer.finalize()
    assert torch.equal(quantizer._eval_value(qp), first)


def test_int8_centroids_export_exact_and_smaller():
    model = _mlp()
    fp16 = QuantNoiseIPQQuantizer(model, min_size=0, n_centroids=32, n_iter=3)
    size_fp16 = fp16.true_size_bytes()
    fp16.detach()
    quantizer = QuantNoiseIPQQuantizer(model, min_size=0, n_centroids=32, n_iter=3,
                                       int8_centroids=True)
    quantizer.finalize()
    entry = quantizer.export()["quantized"]["0.weight"]
    assert entry["c_levels"].dtype == torch.uint8 and "centroids" not in entry
    assert quantizer.true_size_bytes() < size_fp16
    assert quantizer.centroids["0.weight"].detach().half().float().unique().numel() > 0
    stored = quantizer._stored(quantizer.centroids["0.weight"])
    assert stored.unique().numel() <= 256
    x = torch.randn(3, 32)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    quantizer.detach()
    fresh = _mlp(seed=5).eval()
    restore(fresh, deserialize(serialize(quantizer.export())))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("kwargs", [{"p": 1.0}, {"p": -0.1}, {"n_centroids": 1},
                                    {"block_size": 0}, {"stages": []}, {"stages": [[]]},
                                    {"init": "zeros"}, {"noise_frac": 2.0}])
def test_bad_arguments_are_rejected(kwargs):
    with pytest.raises(QuantizerError):
        QuantNoiseIPQQuantizer(nn.Linear(8, 8), min_size=0, **kwargs)


def test_corrupt_state_is_rejected():
    quantizer = QuantNoiseIPQQuantizer(_mlp(), min_size=0, n_centroids=8, n_iter=2)
    quantizer.finalize()
    saved = quantizer.state_dict()
    saved["centroids"]["0.weight"] = saved["centroids"]["0.weight"][:4]
    with pytest.raises(QuantizerError, match="0.weight"):
        quantizer.load_state_dict(saved)
    with pytest.raises(QuantizerError, match="done_stages"):
        quantizer.load_state_dict({"params": []})
    state = quantizer.export()
    state["quantized"]["0.weight"]["centroids"] = state["quantized"]["0.weight"]["centroids"][:2]
    with pytest.raises(QuantizerError, match="corrupt"):
        restore(_mlp(), state)


# ------------------------------------------------------------------- end to end (generic loop)
IPQ_RUN = ("quant=quant_noise_ipq", "quant.min_size=0", "quant.n_centroids=32", "quant.n_iter=5",
           'quant.stages=[["3.*"],["*"]]', "train.epochs=4")


def _preempt_after(monkeypatch, task_cls, n_calls):
    from diffq_bench.train import PREEMPT
    original = task_cls.step
    calls = {"n": 0}

    def step(self, model, batch):
        calls["n"] += 1
        if calls["n"] == n_calls:
            PREEMPT.set()
        return original(self, model, batch)
    monkeypatch.setattr(task_cls, "step", step)
    return original


@pytest.mark.slow
def test_ipq_run_end_to_end_with_resume_inside_the_ipq_phase(compose_toy, toy_task, monkeypatch,
                                                              tmp_path):
    from diffq_bench import cli
    from diffq_bench.train import PREEMPT, Preempted
    from diffq_bench.xp import Xp
    reference = cli.run(compose_toy(*IPQ_RUN, f"paths.root={tmp_path / 'ref'}"))
    cfg = compose_toy(*IPQ_RUN, f"paths.root={tmp_path / 'ref'}")
    history = Xp(cfg.paths.root, cfg).read_history()
    assert [h["phase"] for h in history] == ["noise", "ipq:1/2", "ipq:2/2", "ipq:2/2"]
    metrics = reference["metrics"]
    assert metrics["restore_exact"] == 1.0
    assert metrics["compression"] > 3
    state = deserialize(Xp(cfg.paths.root, cfg).quantized_path.read_bytes())
    assert state["method"] == "quant_noise_ipq" and set(state["quantized"]) == {
        "0.weight", "3.weight", "5.weight"}

    # preempted in the 3rd epoch (stage 1 quantized, centroids being fine-tuned), then resumed
    cfg = compose_toy(*IPQ_RUN, f"paths.root={tmp_path / 'resumed'}")
    original = _preempt_after(monkeypatch, toy_task, 30)
    with pytest.raises(Preempted):
        cli.run(cfg)
    PREEMPT.clear()
    monkeypatch.setattr(toy_task, "step", original)
    resumed = cli.run(cfg)
    stable = lambda r: {k: v for k, v in r["metrics"].items() if k != "wall_time_s"}  # noqa: E731
    assert stable(resumed) == stable(reference)


def test_conv_model_export_restore_exact_with_kernel_and_column_blocks():
    def build(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1),
                             nn.Flatten(), nn.Linear(16 * 36, 8))
    model = build(0)
    quantizer = QuantNoiseIPQQuantizer(model, min_size=0, n_centroids=16, n_iter=4, p=0.2)
    x = torch.randn(2, 3, 6, 6)
    model.train()
    model(x).sum().backward()
    quantizer.finalize()
    state = quantizer.export()
    assert state["quantized"]["0.weight"]["block"] == 9   # 3x3 kernels
    assert state["quantized"]["2.weight"]["block"] == 8   # 1x1 conv: 8 input channels
    model.eval()
    with torch.no_grad():
        expected = model(x)
    quantizer.detach()
    fresh = build(1).eval()
    restore(fresh, deserialize(serialize(state)))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_centroid_gradient_is_the_mean_over_its_blocks():
    model = nn.Linear(16, 32, bias=False)
    quantizer = QuantNoiseIPQQuantizer(model, min_size=0, n_centroids=4, n_iter=3, block_size=8)
    quantizer.finalize()
    centroids, assign = quantizer.centroids["weight"], quantizer.assignments["weight"]
    x = torch.randn(5, 16)
    model.train()
    model(x).pow(2).sum().backward()
    with torch.no_grad():  # dL/dW of the quantized weight, then averaged per codeword
        weight = centroids[assign].reshape(32, 16)
        grad_w = (2 * (x @ weight.t())).t() @ x
        blocks = grad_w.reshape(-1, 8)
        expected = torch.stack([blocks[assign == k].mean(0) for k in range(4)])
    assert torch.allclose(centroids.grad, expected, rtol=1e-4, atol=1e-5)


def test_per_layer_block_sizes_as_fairseq():
    """fairseq's LM iPQ config: FFN blocks of 8, attention and embedding projections of 4."""
    model = nn.ModuleDict({"fc1": nn.Linear(16, 32), "attn": nn.Linear(16, 16), "embed": nn.Linear(16, 16)})
    q = get_quantizer("quant_noise_ipq", model, min_size=0, n_centroids=4, n_iter=2,
                      block_sizes={"fc": 8, "attn": 4, "embed": 4})
    assert {qp.name: q.block_size_of(qp.name) for qp in q.qparams} == {
        "fc1.weight": 8, "attn.weight": 4, "embed.weight": 4}
    state = q.export()
    model.eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = {k: m(x) for k, m in model.items()}
    q.detach()
    fresh = nn.ModuleDict({"fc1": nn.Linear(16, 32), "attn": nn.Linear(16, 16), "embed": nn.Linear(16, 16)})
    restore(fresh, state)
    with torch.no_grad():
        assert all(torch.equal(fresh[k](x), v) for k, v in expected.items())
