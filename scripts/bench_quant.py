"""Benchmark of DiffQ against float training and the official diffq package (issue 17's table).

Every row is measured in one interleaved run: the float baseline, this package and (when it can be
imported; it is never a dependency) the official ``diffq`` package take turns, one step or one call
each in rotating order, so that the load other processes put on the machine hits all of them;
the figures are medians of per-round ratios. Only the ratios mean anything on a shared machine: the
load average before and after is recorded with the thread counts.

Rows:
1. train step (Adam, forward + penalty + backward + step) of DiffQ over float, on the bench LM
   (pre-norm transformer, 4 layers, d=256, vocab 15k, batch 8x128, 7.3M params, g=8) and on the
   embedded default task's own model, batch and loss (wikitext_mini: 0.85M params, 17 tensors,
   g=8 and g=16), at each thread count;
2. eval forward with quantized weights over float (the bench LM, cached eval weights; the official
   package quantizes and restores the weights around every eval forward);
3. pack (export) and unpack + restore of a ~10M-parameter LM at 8 bits everywhere and at mixed
   per-group widths 2..14 (what DiffQ produces): Mparam/s, and this package over the official;
4. packed bytes over the information content (the weights' bits plus the per-tensor header of the
   size accounting), for both packages.

results/bench/quant.json keys the issue checks: ``step_time.ratio_median`` and
``step_time_embedded_lm.ratio_median`` (the largest of the per-configuration medians: the goal holds
for every one), ``mixed_widths.pack_speedup_vs_official`` and ``unpack_speedup_vs_official`` (at one
thread when measured: the official packer is serial C code; every thread count is under
``threads``). With a load average above the core count, runs at 2 threads mostly measure the
scheduler (torch's intra-op threads wait for each other at every operation): compare at 1 thread.

Usage: python scripts/bench_quant.py [--threads 1,2] [--steps 20] [--reps 5] [--quick] [--out PATH]
"""
from __future__ import annotations

import argparse
import copy
import io
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
from diffq_bench.quant import get_quantizer, native, restore

Step = tp.Callable[[], float]


def load_official() -> tp.Tuple[tp.Any, tp.Optional[str]]:
    """The official ``diffq`` module and its version, or (None, None) when it is not installed."""
    try:
        import diffq
    except ImportError:
        return None, None
    from importlib import metadata
    return diffq, metadata.version("diffq")


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


def interleaved(calls: tp.Dict[str, Step], rounds: int, warmup: int = 2, settle: float = 0.0
                ) -> tp.Dict[str, tp.List[float]]:
    """Seconds of each call, once per round in rotating order (after ``warmup`` rounds).

    ``settle``: seconds of sleep before each timed call, so that every call starts with torch's
    OpenMP worker threads asleep. After a parallel operation they spin for a few milliseconds; on
    this 2-vCPU machine a spinning worker slows the serial code that follows by ~1.5x, so without
    it a call's time depends on which call ran before it (used for the one-off export/restore
    calls; train steps run back to back, as in training)."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: tp.Dict[str, tp.List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if settle:
                time.sleep(settle)
            times[name].append(calls[name]())
    return times


def ratio(times: tp.Dict[str, tp.List[float]], num: str, den: str) -> float:
    """Median over the rounds of ``num``'s time over ``den``'s (same round: same machine load)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def timed(fn: tp.Callable[[], tp.Any]) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def train_calls(base: nn.Module, loss_fn: tp.Callable[[nn.Module], torch.Tensor], group_size: int,
                penalty: float, official: tp.Any) -> tp.Dict[str, Step]:
    """One Adam train step of the float model, of a DiffQ copy, and of an official DiffQ copy."""
    calls: tp.Dict[str, Step] = {}
    for kind in ("float", "diffq", "official") if official is not None else ("float", "diffq"):
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        size: tp.Callable[[], torch.Tensor] = lambda: torch.zeros(())  # noqa: E731
        if kind == "diffq":
            quantizer = get_quantizer("diffq", model, group_size=group_size, penalty=penalty)
            quantizer.setup_optimizer(opt)
            size = quantizer.penalty_term
        elif kind == "official":
            quantizer = official.DiffQuantizer(model, group_size=group_size)
            quantizer.setup_optimizer(opt)
            size = (lambda q=quantizer: penalty * q.model_size())  # noqa: E731

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt,
                 size: tp.Callable[[], torch.Tensor] = size) -> float:
            def run() -> None:
                model.train()
                loss = loss_fn(model) + size()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return timed(run)
        calls[kind] = step
    return calls


def summarize(times: tp.Dict[str, tp.List[float]]) -> tp.Dict[str, tp.Any]:
    """Median seconds and median ratios to float (``ratio_median``: DiffQ over float)."""
    out = {f"{name}_s": statistics.median(values) for name, values in times.items()}
    out["ratio_median"] = ratio(times, "diffq", "float")
    if "official" in times:
        out["official_ratio_median"] = ratio(times, "official", "float")
    return out


def bench_lm_steps(threads: tp.List[int], rounds: int, vocab: int, batch: tp.Tuple[int, int],
                   official: tp.Any, dim: int = 256, layers: int = 4) -> tp.Dict[str, tp.Any]:
    torch.manual_seed(0)
    base = TinyLM(vocab, dim, layers)
    tokens = torch.randint(0, vocab, (batch[0], batch[1] + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_fn(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(inputs).reshape(-1, vocab), targets.reshape(-1))

    per_thread, evals = {}, {}
    for t in threads:
        torch.set_num_threads(t)
        per_thread[str(t)] = summarize(interleaved(train_calls(base, loss_fn, 8, 1e-3, official), rounds))
        evals[str(t)] = bench_eval_forward(base, inputs, official, rounds)
    return {"model": f"TinyLM(vocab={vocab}, d={dim}, layers={layers})", "batch": f"{batch[0]}x{batch[1]}",
            "params": sum(p.numel() for p in base.parameters()), "group_size": 8, "penalty": 1e-3,
            "threads": per_thread, "eval_forward": evals,
            "ratio_median": max(v["ratio_median"] for v in per_thread.values())}


def bench_eval_forward(base: nn.Module, inputs: torch.Tensor, official: tp.Any, rounds: int
                       ) -> tp.Dict[str, tp.Any]:
    """Eval forward with quantized weights over float (DiffQ's eval weights are cached after the
    first forward; the official package quantizes and restores around each forward)."""
    models = {"float": copy.deepcopy(base).eval(), "diffq": copy.deepcopy(base).eval()}
    get_quantizer("diffq", models["diffq"], group_size=8)
    if official is not None:
        models["official"] = copy.deepcopy(base).eval()
        official.DiffQuantizer(models["official"], group_size=8)
    calls: tp.Dict[str, Step] = {}
    for kind, model in models.items():
        def call(model: nn.Module = model) -> float:
            with torch.no_grad():
                return timed(lambda: model(inputs))
        calls[kind] = call
    return summarize(interleaved(calls, rounds))


def bench_embedded_steps(threads: tp.List[int], rounds: int, data: str, official: tp.Any,
                         group_sizes: tp.Sequence[int] = (8, 16)) -> tp.Dict[str, tp.Any]:
    """The embedded default task's model, batch and loss (``task.step``), DiffQ at λ=1."""
    from omegaconf import OmegaConf

    from diffq_bench.config import compose
    from diffq_bench.tasks import get_task

    task_cfg = OmegaConf.to_container(compose([]).task, resolve=True)
    task = get_task(task_cfg.pop("name"), **task_cfg)
    task.setup(data, str(Path(data).parent / ".cache"), torch.device("cpu"))
    torch.manual_seed(0)
    batch = next(iter(task.train_batches(0)))
    base = task.build_model()
    configs: tp.Dict[str, tp.Any] = {}
    for g in group_sizes:
        for t in threads:
            torch.set_num_threads(t)
            try:
                calls = train_calls(base, lambda m: task.step(m, batch)[0], g, 1.0, official)
            except Exception as exc:  # noqa: BLE001 - the official package refuses some models
                calls = train_calls(base, lambda m: task.step(m, batch)[0], g, 1.0, None)
                configs.setdefault("official_error", f"{type(exc).__name__}: {exc}")
            configs[f"g{g}_threads{t}"] = summarize(interleaved(calls, rounds))
    quantized = get_quantizer("diffq", copy.deepcopy(base), group_size=16).qparams
    results = {k: v for k, v in configs.items() if isinstance(v, dict)}
    return {"model": "wikitext_mini task model (conf/task/wikitext_mini.yaml)",
            "params": sum(p.numel() for p in base.parameters()), "quantized_tensors": len(quantized),
            "penalty": 1.0, "configs": configs,
            "ratio_median": max(v["ratio_median"] for v in results.values())}


def set_widths(quantizer: tp.Any, mode: str, seed: int = 3) -> None:
    """Logits giving round(bits) = 8 everywhere, or uniform over 2..14 per group (DiffQ's range)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for logit in quantizer.quantizer_parameters():
            bits = torch.full(logit.shape, 8.0) if mode == "8bit" else \
                torch.randint(2, 15, logit.shape, generator=gen).float()
            p = (bits - quantizer.min_bits) / (quantizer.max_bits - quantizer.min_bits)
            logit.copy_(torch.log(p / (1 - p)).clamp(-20, 20))


def bench_packing(mode: str, vocab: int, threads: tp.List[int], rounds: int, official: tp.Any,
                  dim: int = 256, layers: int = 4) -> tp.Dict[str, tp.Any]:
    """export() and restore() of a DiffQ LM (g=16) against the official get_quantized_state() and
    restore_quantized_state() of the same weights and widths."""
    torch.manual_seed(1)
    model = TinyLM(vocab, dim, layers)
    params = sum(p.numel() for p in model.parameters())
    ours = get_quantizer("diffq", model, group_size=16)
    set_widths(ours, mode)
    fresh = TinyLM(vocab, dim, layers)
    calls: tp.Dict[str, Step] = {}
    state: tp.Dict[str, tp.Any] = {"ours": ours.export()}
    calls["pack"] = lambda: timed(lambda: state.update(ours=ours.export()))
    calls["unpack"] = lambda: timed(lambda: restore(fresh, state["ours"]))
    official_bytes = None
    if official is not None:
        theirs_model = TinyLM(vocab, dim, layers)
        theirs_model.load_state_dict(model.state_dict())
        theirs = official.DiffQuantizer(theirs_model, group_size=16)
        names = {id(p): n for n, p in theirs_model.named_parameters()}
        for qp in theirs._qparams:
            qp.logit.data.copy_(ours.logits[names[id(qp.param)]].data)
        receiver = official.DiffQuantizer(TinyLM(vocab, dim, layers), group_size=16)
        state["official"] = theirs.get_quantized_state()
        calls["official_pack"] = lambda: timed(lambda: state.update(official=theirs.get_quantized_state()))
        calls["official_unpack"] = lambda: timed(lambda: receiver.restore_quantized_state(state["official"]))
        buf = io.BytesIO()
        torch.save(state["official"], buf)
        official_bytes = len(buf.getvalue())
    per_thread = {}
    for t in threads:
        torch.set_num_threads(t)
        times = interleaved(calls, rounds, warmup=1, settle=0.05)
        med = {name: statistics.median(values) for name, values in times.items()}
        entry = {"pack_s": med["pack"], "unpack_restore_s": med["unpack"],
                 "pack_mparam_per_s": params / med["pack"] / 1e6, "unpack_mparam_per_s": params / med["unpack"] / 1e6}
        if official is not None:  # speedup: the official's time over ours, round by round
            entry.update(official_pack_mparam_per_s=params / med["official_pack"] / 1e6,
                         official_unpack_mparam_per_s=params / med["official_unpack"] / 1e6,
                         pack_speedup_vs_official=ratio(times, "official_pack", "pack"),
                         unpack_speedup_vs_official=ratio(times, "official_unpack", "unpack"))
        per_thread[str(t)] = entry
    widths = torch.cat([ours.eval_bits(qp) for qp in ours.qparams])
    ideal = ours.true_model_size() * 2 ** 20  # the analytic size: bits of the weights, headers, floats
    true_bytes = ours.true_size_bytes()
    result: tp.Dict[str, tp.Any] = {
        "model": f"TinyLM(vocab={vocab}, d={dim}, layers={layers})", "params": params, "group_size": 16,
        "widths": [int(widths.min()), int(widths.max())], "bits_per_weight": ours.bits_per_weight(),
        "threads": per_thread, "true_size_bytes": true_bytes, "ideal_bytes": ideal,
        "bytes_over_ideal": true_bytes / ideal}
    if official is not None:  # headline: one thread when measured (the official packer is serial C)
        head = per_thread.get("1", next(iter(per_thread.values())))
        result.update(official_bytes=official_bytes, official_bytes_over_ideal=official_bytes / ideal,
                      pack_speedup_vs_official=head["pack_speedup_vs_official"],
                      unpack_speedup_vs_official=head["unpack_speedup_vs_official"])
    else:
        result.update(pack_speedup_vs_official=None, unpack_speedup_vs_official=None)
    return result


def main(argv: tp.Optional[tp.List[str]] = None) -> tp.Dict[str, tp.Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="interleaved rounds of the bench-LM steps")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds of pack/unpack")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few rounds (tests; figures meaningless)")
    parser.add_argument("--data", default=os.environ.get("DIFFQ_BENCH_DATA", "data"),
                        help="where the embedded LM corpus is (written there on first use)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "bench" / "quant.json"))
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    official, version = load_official()
    native.load()  # build (first time on this machine) or load the compiled noise fill before timing
    load_before = os.getloadavg()
    began = time.time()
    if args.quick:  # every row, on tiny models, for a test: the figures mean nothing
        lm = bench_lm_steps(threads, 2, 500, (2, 16), official, dim=64, layers=1)
        emb = bench_embedded_steps(threads, 2, args.data, official, group_sizes=(16,))
        packs = {mode: bench_packing(mode, 500, threads, 2, official, dim=64, layers=1)
                 for mode in ("8bit", "mixed")}
    else:
        lm = bench_lm_steps(threads, args.steps, 15000, (8, 128), official)
        emb = bench_embedded_steps(threads, 4 * args.steps, args.data, official)
        packs = {mode: bench_packing(mode, 27000, threads, args.reps, official) for mode in ("8bit", "mixed")}
    result = {
        "step_time": lm, "step_time_embedded_lm": emb, "all_8bit": packs["8bit"], "mixed_widths": packs["mixed"],
        "env": {"torch": torch.__version__, "official_diffq": version, "threads": threads, "quick": args.quick,
                "machine": platform.machine(), "cpu_count": os.cpu_count(), "native_noise_fill": native.status(),
                "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
                "seconds": time.time() - began, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}}
    report(result)
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")
    return result


def report(r: tp.Dict[str, tp.Any]) -> None:
    """The issue's table: float = 1, then official and ours."""
    def pair(entry: tp.Dict[str, tp.Any], key: str = "ratio_median") -> str:
        theirs = entry.get(f"official_{key}")
        return f"{theirs:.2f}" if theirs is not None else "-", f"{entry[key]:.2f}"

    env = r["env"]
    fill = env.get("native_noise_fill") or {}
    print(f"load average {env['load_average_before'][0]:.2f} -> {env['load_average_after'][0]:.2f} "
          f"on {env['cpu_count']} CPUs; official diffq {env['official_diffq'] or 'not installed'}; noise fill: "
          f"{'compiled (torch threads)' if fill.get('loaded') else 'Python threads (' + str(fill.get('error')) + ')'}")
    print("| what | threads | official | ours |")
    print("|---|---|---|---|")
    for t, entry in r["step_time"]["threads"].items():
        print(f"| train step, bench LM, over float | {t} | {' | '.join(pair(entry))} |")
    for name, entry in r["step_time_embedded_lm"]["configs"].items():
        if isinstance(entry, dict):
            g, t = name[1:].split("_threads")
            print(f"| train step, embedded model g{g}, over float | {t} | {' | '.join(pair(entry))} |")
    for t, entry in r["step_time"]["eval_forward"].items():
        print(f"| eval forward, quantized weights, over float | {t} | {' | '.join(pair(entry))} |")
    for label, key in (("pack, all 8 bits", "all_8bit"), ("pack, mixed widths 2-14", "mixed_widths")):
        for t, entry in r[key]["threads"].items():
            for what, field in (("", "pack"), (" unpack+restore", "unpack")):
                theirs = entry.get(f"official_{field}_mparam_per_s")
                ratio = entry.get(f"{field}_speedup_vs_official")
                print(f"| {label}{what}, Mparam/s | {t} | {f'{theirs:.0f}' if theirs else '-'} | "
                      f"{entry[f'{field}_mparam_per_s']:.0f}{f' ({ratio:.2f}x)' if ratio else ''} |")
    mixed = r["mixed_widths"]
    theirs = mixed.get("official_bytes_over_ideal")
    print(f"| packed / information size, mixed widths | - | {f'{theirs:.4f}' if theirs else '-'} | "
          f"{mixed['bytes_over_ideal']:.4f} |")


if __name__ == "__main__":
    main()
