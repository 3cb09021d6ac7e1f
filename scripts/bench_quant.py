"""Benchmark of the quantizer library; writes results/bench/quant.json.

Measures, on CPU by default:
1. DiffQ train step time / float train step time, same model, batch and optimizer (Adam), on a
   transformer LM of the embedded size (4 layers, d=256, vocab 15k, batch 8x128). Steps of the two
   models are interleaved and the median ratio reported, so load from other processes hits both.
2. Pack (export) and unpack (restore) throughput on a ~10M-parameter LM with learned-like mixed
   bit widths.
3. Packed bytes (true_size_bytes) over the information-theoretic size (Σ bits/8 plus the small
   per-tensor header of the analytic accounting), on the same ~10M-parameter model.
(1) is also measured on the embedded default task itself: wikitext_mini's 0.85M-parameter model,
its batch and loss (``task.step``), 17 quantized tensors.

Usage: python scripts/bench_quant.py [--steps 20] [--threads 2] [--device cpu] [--data DIR] [--out PATH]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
import typing as tp
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from diffq_bench.io import write_json
from diffq_bench.quant import get_quantizer, restore
from diffq_bench.quant.base import MB
from diffq_bench.quant.pack import pack_uint, unpack_uint


class TinyLM(nn.Module):
    """Pre-norm causal transformer LM with tied input/output embeddings."""

    def __init__(self, vocab: int, dim: int = 256, layers: int = 4, heads: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1024, dim) * 0.02)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.emb(tokens) + self.pos[:t]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return F.linear(self.norm(x), self.emb.weight)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _paired_steps(base: nn.Module, loss_fn: tp.Callable[[nn.Module], torch.Tensor],
                  penalty: float, device: torch.device, steps: int) -> tp.Dict[str, tp.Any]:
    """Train steps (Adam) of ``base`` and of a DiffQ copy of it (g=16, λ=``penalty``), interleaved
    in alternating order so that load from other processes hits both; wall and CPU medians."""
    models = {"float": base, "diffq": copy.deepcopy(base)}
    quantizer = get_quantizer("diffq", models["diffq"], group_size=16, penalty=penalty)
    optims = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in models.items()}
    quantizer.setup_optimizer(optims["diffq"])

    def step(kind: str) -> tp.Tuple[float, float]:
        model, opt = models[kind], optims[kind]
        model.train()
        _sync(device)
        begin, cpu_begin = time.perf_counter(), time.process_time()
        loss = loss_fn(model)
        if kind == "diffq":
            loss = loss + quantizer.penalty_term()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - begin, time.process_time() - cpu_begin

    for _ in range(3):  # warm-up: allocator, kernels, Adam state
        step("float"), step("diffq")
    times: tp.Dict[str, tp.List[float]] = {"float": [], "diffq": []}
    ratios, cpu_ratios = [], []
    for i in range(steps):
        order = ("float", "diffq") if i % 2 == 0 else ("diffq", "float")
        got = {kind: step(kind) for kind in order}
        for kind in got:
            times[kind].append(got[kind][0])
        ratios.append(got["diffq"][0] / got["float"][0])
        # CPU seconds of this process: robust to other processes taking the cores (wall is not)
        cpu_ratios.append(got["diffq"][1] / got["float"][1])
    return {"params": sum(p.numel() for p in base.parameters()),
            "quantized_tensors": len(quantizer.qparams),
            "quantizer": f"diffq(group_size=16, penalty={penalty:g})",
            "float_step_s": statistics.median(times["float"]),
            "diffq_step_s": statistics.median(times["diffq"]),
            "ratio_median": statistics.median(ratios), "ratios": ratios,
            "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios,
            "_diffq_model": models["diffq"]}


def bench_step_ratio(device: torch.device, steps: int, vocab: int) -> tp.Dict[str, tp.Any]:
    torch.manual_seed(0)
    base = TinyLM(vocab).to(device)
    tokens = torch.randint(0, vocab, (8, 129), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_fn(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(inputs).reshape(-1, vocab), targets.reshape(-1))

    out = _paired_steps(base, loss_fn, 1e-3, device, steps)
    model = out.pop("_diffq_model")
    model.eval()
    with torch.no_grad():
        _sync(device)
        begin = time.perf_counter()
        model(inputs)  # first eval forward quantizes
        _sync(device)
        first = time.perf_counter() - begin
        begin = time.perf_counter()
        model(inputs)  # cached eval weights
        _sync(device)
        cached = time.perf_counter() - begin
    return {"model": f"TinyLM(vocab={vocab}, d=256, layers=4)", "batch": "8x128", **out,
            "eval_forward_first_s": first, "eval_forward_cached_s": cached}


def bench_embedded_lm_ratio(device: torch.device, steps: int, data: str) -> tp.Dict[str, tp.Any]:
    """The same ratio on the embedded default task itself (wikitext_mini: its model, batch and
    loss through ``task.step``, DiffQ with the default λ=1, g=16)."""
    from omegaconf import OmegaConf

    from diffq_bench.config import compose
    from diffq_bench.tasks import get_task

    task_cfg = OmegaConf.to_container(compose([]).task, resolve=True)
    task = get_task(task_cfg.pop("name"), **task_cfg)
    task.setup(data, str(Path(data).parent / ".cache"), device)
    torch.manual_seed(0)
    batch = next(iter(task.train_batches(0)))
    out = _paired_steps(task.build_model().to(device), lambda m: task.step(m, batch)[0], 1.0,
                        device, steps)
    out.pop("_diffq_model")
    return {"model": "wikitext_mini task model (conf/task/wikitext_mini.yaml)", **out}


def bench_packing(device: torch.device, vocab: int) -> tp.Dict[str, tp.Any]:
    torch.manual_seed(1)
    model = TinyLM(vocab).to(device)
    quantizer = get_quantizer("diffq", model, group_size=16)
    with torch.no_grad():  # spread the widths over 2..8 bits, as after training with a penalty
        for logit in quantizer.quantizer_parameters():
            logit.uniform_(-4.0, -1.0)
    params = sum(p.numel() for p in model.parameters())
    begin, cpu_begin = time.perf_counter(), time.process_time()
    state = quantizer.export()
    pack_s, pack_cpu = time.perf_counter() - begin, time.process_time() - cpu_begin
    true_bytes = quantizer.true_size_bytes()
    fresh = TinyLM(vocab).to(device)
    begin, cpu_begin = time.perf_counter(), time.process_time()
    restore(fresh, state)
    unpack_s, unpack_cpu = time.perf_counter() - begin, time.process_time() - cpu_begin
    packed = sum(e["levels"].numel() + e["bits"].numel() for e in state["quantized"].values())
    info_bits = sum(float(quantizer._param_bits(qp, rounded=True)) for qp in quantizer.qparams)
    weight_bits = sum(float((_group_lengths(qp.param.numel(), quantizer.group_size)
                             * quantizer.eval_bits(qp).float()).sum()) for qp in quantizer.qparams)
    float_bytes = sum(p.numel() * 4 for _, p in quantizer._float_params)
    ideal = info_bits / 8 + float_bytes
    return {"model": f"TinyLM(vocab={vocab}, d=256, layers=4)", "params": params,
            "bits_per_weight": quantizer.bits_per_weight(),
            "pack_s": pack_s, "unpack_restore_s": unpack_s,
            "pack_mparam_per_s": params / pack_s / 1e6, "unpack_mparam_per_s": params / unpack_s / 1e6,
            "pack_mparam_per_cpu_s": params / pack_cpu / 1e6,
            "unpack_mparam_per_cpu_s": params / unpack_cpu / 1e6,
            "pack_float_mb_per_s": params * 4 / MB / pack_s,
            "unpack_float_mb_per_s": params * 4 / MB / unpack_s,
            "packed_mb_per_s": packed / MB / pack_s,
            "true_size_bytes": true_bytes, "ideal_bytes": ideal,
            "bytes_over_ideal": true_bytes / ideal,
            "bytes_over_pure_bits": true_bytes / (weight_bits / 8 + float_bytes)}


def _group_lengths(n: int, group_size: int) -> torch.Tensor:
    """Entries per group of a tensor of ``n`` entries (the last group may be shorter)."""
    g = group_size or n
    lengths = torch.full((-(-n // g),), float(g))
    lengths[-1] = n - g * (len(lengths) - 1)
    return lengths


def bench_raw_packing(count: int = 10_000_000) -> tp.Dict[str, tp.Any]:
    """pack_uint / unpack_uint alone, per width, on ``count`` random values."""
    out = {}
    gen = torch.Generator().manual_seed(2)
    for nbits in (2, 3, 4, 8, 15):
        values = torch.randint(0, 2 ** nbits, (count,), generator=gen, dtype=torch.int32)
        begin = time.perf_counter()
        packed = pack_uint(values, nbits)
        pack_s = time.perf_counter() - begin
        begin = time.perf_counter()
        back = unpack_uint(packed, nbits, count)
        unpack_s = time.perf_counter() - begin
        assert torch.equal(back, values.long()) and packed.numel() == (count * nbits + 7) // 8
        out[str(nbits)] = {"pack_mvalues_per_s": count / pack_s / 1e6,
                           "unpack_mvalues_per_s": count / unpack_s / 1e6,
                           "pack_out_mb_per_s": packed.numel() / MB / pack_s,
                           "unpack_in_mb_per_s": packed.numel() / MB / unpack_s}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=15000, help="vocab of the step-time LM")
    parser.add_argument("--pack-vocab", type=int, default=27000, help="vocab of the ~10M LM")
    parser.add_argument("--data", default=os.environ.get("DIFFQ_BENCH_DATA", "data"),
                        help="where the embedded LM corpus is (written there on first use)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1]
                                                / "results" / "bench" / "quant.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    step = bench_step_ratio(device, args.steps, args.vocab)
    print(f"(1) train step: float {step['float_step_s'] * 1e3:.1f} ms, DiffQ "
          f"{step['diffq_step_s'] * 1e3:.1f} ms, median ratio {step['ratio_median']:.3f} wall, "
          f"{step['cpu_ratio_median']:.3f} CPU time (target <= 1.10); "
          f"eval forward {step['eval_forward_first_s'] * 1e3:.1f} ms first, "
          f"{step['eval_forward_cached_s'] * 1e3:.1f} ms cached")
    emb = bench_embedded_lm_ratio(device, 4 * args.steps, args.data)
    print(f"    embedded default LM ({emb['params'] / 1e6:.2f}M params, {emb['quantized_tensors']} "
          f"quantized tensors): float {emb['float_step_s'] * 1e3:.1f} ms, DiffQ "
          f"{emb['diffq_step_s'] * 1e3:.1f} ms, median ratio {emb['ratio_median']:.3f}")
    pack = bench_packing(device, args.pack_vocab)
    print(f"(2) pack {pack['pack_mparam_per_s']:.1f} Mparam/s ({pack['pack_float_mb_per_s']:.0f} "
          f"MB/s of float32 weights), unpack+restore {pack['unpack_mparam_per_s']:.1f} Mparam/s "
          f"({pack['unpack_float_mb_per_s']:.0f} MB/s) on {pack['params'] / 1e6:.1f}M params; per CPU "
          f"second: {pack['pack_mparam_per_cpu_s']:.1f} / {pack['unpack_mparam_per_cpu_s']:.1f} Mparam")
    print(f"(3) true size {pack['true_size_bytes']} B / information-theoretic "
          f"{pack['ideal_bytes']:.0f} B = {pack['bytes_over_ideal']:.4f} (target <= 1.01); "
          f"over pure Σbits/8 + floats: {pack['bytes_over_pure_bits']:.4f}; "
          f"{pack['bits_per_weight']:.2f} bits/weight")
    raw = bench_raw_packing()
    print("    raw pack_uint/unpack_uint, Mvalues/s by width: " + ", ".join(
        f"{k} bits {v['pack_mvalues_per_s']:.0f}/{v['unpack_mvalues_per_s']:.0f}" for k, v in raw.items()))
    result = {"step_time": step, "step_time_embedded_lm": emb, "packing": pack, "raw_packing": raw,
              "env": {"torch": torch.__version__, "threads": args.threads, "device": str(device),
                      "machine": platform.machine(), "cpu_count": os.cpu_count(),
                      "load_average_1min": os.getloadavg()[0],
                      "date": time.strftime("%Y-%m-%dT%H:%M:%S")}}
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
