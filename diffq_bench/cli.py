"""Command-line entry points: ``diffq-bench`` (Hydra app), ``diffq-bench-table``, ``diffq-bench-status``.

Only wiring lives here: validate the config, open the run folder, skip finished runs, call the
training loop, record the outcome (result.json / status.json) and print the result row.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
import typing as tp
from pathlib import Path

import hydra
from omegaconf import DictConfig

from . import io
from .checkpoint import seed_all
from .config import ConfigError, find_conf_dir, to_container, validate
from .data.errors import DataMissingError
from .finish import finish
from .launch import slurm
from .launch import status as status_view
from .results.load import DEFAULT_REFERENCE_DIR, load_references, load_results
from .results.plots import plot_sections
from .results.render import FORMATS, render, render_sections
from .results.table import build_sections, build_table
from .tasks import get_task
from .train import Preempted, Trainer, resolve_device
from .xp import Xp, axes, now_iso

logger = logging.getLogger(__name__)

ROW_COLUMNS = (("test", "test {metric}"), ("true_size_mb", "true size (MB)"),
               ("compression", "compression"), ("bits_per_weight", "bits/weight"),
               ("wall_time_s", "wall time (s)"))


def format_row(result: tp.Dict[str, tp.Any]) -> str:
    """The one-row markdown table printed at the end of a run (or for a finished run)."""
    metric = result["metric"]
    metrics = result["metrics"]
    head = ["run", "task", "quant"]
    cells = [result["sig"], result["task"], result["quant"]]
    for key, title in ROW_COLUMNS:
        name = f"test_{metric}" if key == "test" else key
        head.append(title.format(metric=metric))
        value = metrics.get(name)
        cells.append(None if value is None else f"{value:.4g}" if key != "wall_time_s" else f"{value:.1f}")
    return render(head, [cells], "md").rstrip("\n")


def run(cfg: DictConfig) -> tp.Dict[str, tp.Any]:
    """Run (or resume, or just report) the experiment described by ``cfg``; returns result.json's dict.

    Args:
        cfg: the composed config.
    Raises:
        ConfigError: invalid config (raised before any folder or data is touched).
    """
    validate(cfg)
    plain = to_container(cfg)
    xp = Xp(plain["paths"]["root"], cfg)
    xp.create()
    xp.lock()
    try:
        runtime = plain.get("runtime", {})
        grids = [plain["grid"]["name"]] if isinstance(plain.get("grid"), dict) and "name" in plain["grid"] else []
        if xp.is_done() and not runtime.get("force"):
            result = xp.read_result()
            if result is None:  # is_done() checked the file exists: it vanished in between
                raise RuntimeError(f"{xp.result_path} disappeared while reading it")
            print(f"run {xp.sig} already finished ({xp.folder}); not training again", flush=True)
            print(format_row(result), flush=True)
            return result
        if runtime.get("force"):
            for path in (xp.checkpoint_path, xp.best_path, xp.result_path):
                path.unlink(missing_ok=True)
        status = xp.start_attempt(grids, slurm.current_job_id())
        xp.log(f"attempt {status['attempt']} started on {status['host']} (pid {status['pid']})")
        logger.info("run %s -> %s (attempt %d)", xp.sig, xp.folder, status["attempt"])
        try:
            device = resolve_device(str(plain.get("device", "auto")))
            seed_all(int(plain["seed"]))
            task_kw = {k: v for k, v in plain["task"].items() if k != "name"}
            task = get_task(plain["task"]["name"], **task_kw)
            task.setup(plain["paths"]["data"], plain["paths"]["cache"], device,
                       num_workers=int(plain.get("num_workers", 0)), seed=int(plain["seed"]))
            trainer = Trainer(plain, task, xp, device, runtime)
            trainer.fit()
            metrics = finish(trainer)
        except Preempted as exc:
            status = xp.read_status() or {}
            xp.write_status("QUEUED", requeues=int(status.get("requeues", 0)) + 1, traceback=None)
            xp.log(str(exc))
            raise
        except BaseException:
            tb = traceback.format_exc()
            xp.write_status("FAILED", traceback=tb)
            xp.log("FAILED\n" + tb)
            raise
        result = {"sig": xp.sig, "task": plain["task"]["name"], "quant": plain["quant"]["name"],
                  "metric": task.metric, "lower_is_better": task.lower_is_better, "axes": axes(cfg),
                  "penalty": {"scale": task.penalty_scale, "convention": task.penalty_convention()},
                  "metrics": metrics, "grids": (xp.read_status() or {}).get("grids", grids),
                  "finished": now_iso()}
        xp.write_result(result)
        xp.write_status("DONE", epoch=int(plain["train"]["epochs"]))
        xp.log("DONE")
        print(format_row(result), flush=True)
        return result
    finally:
        xp.unlock()


def _hydra_task(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as exc:
        # Bad config: a one-line message, no traceback, non-zero exit (SystemExit passes Hydra).
        print(f"diffq-bench: config error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except DataMissingError as exc:
        # The run is recorded FAILED (traceback in status.json); the user needs the path, not a stack.
        print(f"diffq-bench: data missing: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def main() -> None:
    """``diffq-bench [overrides]``: the Hydra app (single run or ``-m`` sweep)."""
    try:
        conf_dir = find_conf_dir()
    except ConfigError as exc:
        print(f"diffq-bench: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    hydra.main(config_path=str(conf_dir), config_name="config", version_base="1.3")(_hydra_task)()


def table_main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """``diffq-bench-table [--root outputs] [--task T] [--quant Q] [--grid G] [--format md|csv|latex]
    [--plot out.png] [--per-run] [-o FILE]``: paper tables from the run store."""
    parser = argparse.ArgumentParser(
        prog="diffq-bench-table",
        description="Paper tables (and trade-off plots) from the finished runs of a run store, next "
                    "to the published numbers.")
    parser.add_argument("--root", default="outputs", help="run store root (paths.root)")
    parser.add_argument("--task", help="only runs of this task (task.name)")
    parser.add_argument("--quant", help="only runs of this quantizer (quant.name)")
    parser.add_argument("--grid", help="only runs launched by this grid (+grid=NAME)")
    parser.add_argument("--format", choices=FORMATS, default="md")
    parser.add_argument("-o", "--output", help="write the table to this file instead of stdout")
    parser.add_argument("--plot", help="also write the metric-vs-size plot (PNG) here")
    parser.add_argument("--reference", default=str(DEFAULT_REFERENCE_DIR),
                        help="folder of published numbers (*.yaml); 'none' to leave them out")
    parser.add_argument("--per-run", action="store_true",
                        help="one raw row per run with every varying axis and metric (no grouping)")
    args = parser.parse_args(argv)
    found = load_results(args.root, args.task, args.quant, args.grid)
    if not found:
        print(f"no finished runs under {Path(args.root) / 'xps'} match the filters", file=sys.stderr)
        raise SystemExit(1)
    refs = [] if args.reference.lower() == "none" else load_references(args.reference)
    title = f"grid {args.grid}" if args.grid else None
    if args.per_run:
        text = render(*build_table(found), args.format)
    else:
        text = render_sections(build_sections(found, refs), args.format, title=title)
    if args.output:
        io.write_text(args.output, text)
    else:
        sys.stdout.write(text)
    if args.plot:
        plot_sections(build_sections(found, refs), args.plot, title=title)


def status_main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """``diffq-bench-status [--grid NAME] [--root DIR] [--json] [OVERRIDES...]``: one line per run."""
    parser = argparse.ArgumentParser(
        prog="diffq-bench-status",
        description="One line per run of a run store (or of a grid): state, scheduler job, attempt, "
                    "epoch, log age and best metric.")
    parser.add_argument("--grid", help="only the runs of conf/grid/<NAME>.yaml (never launched: NEW)")
    parser.add_argument("--root", default="outputs", help="run store root (paths.root), default: outputs")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("overrides", nargs="*",
                        help="with --grid: the overrides the grid was launched with (task=...)")
    args = parser.parse_args(argv)
    if args.overrides and not args.grid:
        parser.error("overrides are only meaningful with --grid")
    root = Path(args.root)
    if not args.grid and not (root / "xps").is_dir():
        parser.error(f"no run store at {root / 'xps'} (pass --root, the paths.root of your runs)")
    try:
        rows = status_view.collect(root, args.grid, args.overrides)
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(rows, indent=2) if args.json else status_view.render(rows))


if __name__ == "__main__":
    main()
