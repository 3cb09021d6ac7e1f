"""Training throughput of one run on 1 vs 2 processes (torch.distributed, gloo on CPU).

The same run (embedded WikiText LM, debug size, DiffQ) is trained with ``torchrun
--nproc_per_node=1`` and ``--nproc_per_node=2`` (same global batch, so the same run), interleaved
``--repeats`` times; each process gets ``cores // processes`` threads. The ratio reported is the
median training wall time (result.json's ``wall_time_s``, training only) of 1 process over that of
2 processes: > 1 means 2 processes train faster. Saved to results/bench/dist.json.

    python scripts/bench_dist.py [--repeats 3] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(nproc: int, steps: int, store: Path, data: Path) -> float:
    threads = max(1, (os.cpu_count() or 1) // nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "diffq_bench.cli", "task=wikitext_mini", "quant=diffq", "train.epochs=1",
           f"train.steps_per_epoch={steps}", "task.eval_subset=8", f"paths.root={store}",
           f"paths.data={data}", "runtime.progress=false", "runtime.force=true"]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{nproc}-process run failed:\n{out.stderr[-2000:]}")
    (folder,) = (store / "xps").iterdir()
    return float(json.loads((folder / "result.json").read_text())["metrics"]["wall_time_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("-o", "--output", default=str(ROOT / "results" / "bench" / "dist.json"))
    args = parser.parse_args()
    times: dict = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for rep in range(args.repeats):
            for nproc in (1, 2) if rep % 2 == 0 else (2, 1):  # interleaved, alternating order
                times[nproc].append(one(nproc, args.steps, Path(tmp) / f"s{nproc}", data))
                print(f"repeat {rep + 1}: {nproc} process(es) {times[nproc][-1]:.2f} s", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    ratio = med[1] / med[2]
    load = os.getloadavg()[0]
    print(f"training wall time, median of {args.repeats}: 1 process {med[1]:.2f} s, 2 processes {med[2]:.2f} s; "
          f"speed-up x{ratio:.2f} (load average {load:.2f}, {os.cpu_count()} cores)")
    report = {"bench": "dist", "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
              "load_average_1m": load, "steps": args.steps, "seconds": times, "median_s": med,
              "speedup_2_over_1": ratio, "device": "cpu (gloo)"}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
