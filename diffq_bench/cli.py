"""Command-line entry points: ``diffq-bench`` (Hydra app), ``diffq-bench-table``, ``diffq-bench-status``.

Only wiring lives here: validate the config, open the run folder, skip finished runs, call the
training loop, record the outcome (result.json / status.json) and print the result row.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback
import typing as tp
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from . import distributed, io
from .checkpoint import seed_all
from .config import ConfigError, check_device, check_overrides, find_conf_dir, group_options, to_container, validate
from .data import fingerprint
from .data.errors import DataChangedError, DataCorruptError, DataMissingError
from .finish import finish
from .init import InitError
from .io import LoadError
from .launch import slurm
from .launch import status as status_view
from .launch.reference import reference_line
from .results.load import DEFAULT_REFERENCE_DIR, load_references, load_results
from .results.plots import plot_sections
from .results.render import FORMATS, render, render_sections
from .results.report import format_row
from .results.table import build_sections, build_table
from .tasks import get_task
from .train import PREEMPT, Preempted, Trainer, resolve_device
from .xp import RunLockedError, Xp, axes, now_iso

logger = logging.getLogger(__name__)

class Interrupt:
    """SIGINT/SIGTERM to a run started from a shell: checkpoint at the next step boundary, then
    stop with status INTERRUPTED (resumable), instead of dying mid-step. A second signal stops at
    once (the run is still marked INTERRUPTED and resumes from its last checkpoint)."""

    def __init__(self) -> None:
        self.signum: tp.Optional[int] = None

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: tp.Any) -> None:
        if self.signum is not None:  # second signal: no more waiting
            raise KeyboardInterrupt
        self.signum = signum
        PREEMPT.set()
        print(f"\ndiffq-bench: {signal.Signals(signum).name}: checkpointing at the next step "
              "(signal again to stop now)", file=sys.stderr, flush=True)


INTERRUPT = Interrupt()


def execution_env(device: torch.device) -> tp.Dict[str, tp.Any]:
    """What changes a run's numbers without changing its identity: recorded per attempt in
    status.json, compared when a run resumes."""
    return {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "processes": distributed.current().world}


def _check_env(xp: Xp, env: tp.Dict[str, tp.Any], status: tp.Mapping[str, tp.Any]) -> None:
    before = status.get("env")
    if before and before != env and xp.checkpoint_path.exists():
        changed = ", ".join(f"{k} {before.get(k)} -> {env.get(k)}" for k in env if before.get(k) != env.get(k))
        message = (f"resuming run {xp.sig} in another execution environment ({changed}): its numbers may "
                   "differ slightly from an uninterrupted run")
        logger.warning(message)
        xp.log(f"warning: {message}")


def _check_data(xp: Xp, task: tp.Any) -> tp.Optional[tp.Dict[str, tp.Any]]:
    """Refuse to reuse or resume a run trained on other data (data.json vs the files now)."""
    now = task.data_fingerprint()
    recorded = xp.read_data()
    if now is not None and recorded is not None:
        changed = fingerprint.differences(recorded, now)
        if changed:
            raise DataChangedError(
                f"run {xp.sig} was trained on other data than {task.data_dir} holds now ({changed}); "
                "use another paths.root, restore the data, or runtime.force=true to train it again")
    return now


def run(cfg: DictConfig) -> tp.Dict[str, tp.Any]:
    """Run (or resume, or just report) the experiment described by ``cfg``; returns result.json's dict.

    A finished run is reported without writing anything (a read-only store works); its data is
    checked first. Failure is truthful: status.json says FAILED with the traceback (INTERRUPTED
    after a signal, QUEUED after a preemption) and the exception propagates.

    Args:
        cfg: the composed config.
    Raises:
        ConfigError: invalid config (raised before any folder or data is touched).
        RunLockedError: another live process runs this config.
        DataChangedError: the run's data changed since it was trained.
    """
    validate(cfg)
    plain = to_container(cfg)
    check_device(str(plain.get("device", "auto")))  # here, not in validate: a login node has no GPU
    xp = Xp(plain["paths"]["root"], cfg)
    device = distributed.local_device(resolve_device(str(plain.get("device", "auto"))))
    dist_cfg = plain.get("dist") or {}
    if dist_cfg.get("sync_bn") and distributed.env_world().world > 1:
        try:  # before any data: the run would fail at model set-up
            distributed.check_sync_bn(device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    rank = distributed.setup(device, str(dist_cfg.get("backend", "auto")), float(dist_cfg.get("timeout_s", 1800)))
    if rank.active:
        result = _run_rank(cfg, plain, xp, device, rank)
        distributed.mark_done()  # leave the process group with the other ranks at exit
        return result
    return _run_single(cfg, plain, xp, device, rank)


def _make_task(plain: tp.Mapping[str, tp.Any]) -> tp.Any:
    """The task of a resolved config (constructor only: no data is touched)."""
    return get_task(plain["task"]["name"], **{k: v for k, v in plain["task"].items() if k != "name"})


def _setup_task(task: tp.Any, plain: tp.Mapping[str, tp.Any], device: torch.device) -> None:
    task.setup(plain["paths"]["data"], plain["paths"]["cache"], device,
               num_workers=int(plain.get("num_workers", 0)), seed=int(plain["seed"]))


def _train_and_finish(plain: tp.Dict[str, tp.Any], task: tp.Any, xp: Xp, device: torch.device) -> tp.Dict[str, float]:
    """Train (or resume) then test, export and check the export; the final metrics."""
    trainer = Trainer(plain, task, xp, device, plain.get("runtime", {}))
    trainer.fit()
    return finish(trainer)


def _run_single(cfg: DictConfig, plain: tp.Dict[str, tp.Any], xp: Xp, device: torch.device,
                rank: distributed.Dist) -> tp.Dict[str, tp.Any]:
    runtime = plain.get("runtime", {})
    task = _make_task(plain)
    if xp.is_done() and not runtime.get("force"):
        _setup_task(task, plain, device)
        _check_data(xp, task)
        result = xp.read_result()
        if result is None:  # is_done() checked the file exists: it vanished in between
            raise RuntimeError(f"{xp.result_path} disappeared while reading it")
        distributed.share_start("done")
        print(f"run {xp.sig} already finished ({xp.folder}); not training again", flush=True)
        print(format_row(result), flush=True)
        return result
    xp.create()
    xp.lock()
    try:
        grids = [plain["grid"]["name"]] if isinstance(plain.get("grid"), dict) and "name" in plain["grid"] else []
        if runtime.get("force"):
            for path in (xp.checkpoint_path, xp.best_path, xp.result_path, xp.data_path):
                path.unlink(missing_ok=True)
        previous = xp.read_status() or {}
        env = execution_env(device)
        status = xp.start_attempt(grids, slurm.current_job_id(), env)
        for stale in xp.folder.glob("failure.rank*.txt"):  # other ranks' failures of an earlier attempt
            stale.unlink(missing_ok=True)
        xp.log(f"attempt {status['attempt']} started on {status['host']} (pid {status['pid']})"
               + (f" with {rank.world} processes" if rank.active else ""))
        logger.info("run %s -> %s (attempt %d)", xp.sig, xp.folder, status["attempt"])
        try:
            _check_env(xp, env, previous)
            seed_all(int(plain["seed"]))
            _setup_task(task, plain, device)
            data = _check_data(xp, task)
            if data is not None:
                xp.write_data(data)
            distributed.share_start("start")  # the others set up now (embedded data is written)
            metrics = _train_and_finish(plain, task, xp, device)
        except (Preempted, KeyboardInterrupt) as exc:
            where = str(exc) if isinstance(exc, Preempted) else "interrupted"
            if INTERRUPT.signum is not None or isinstance(exc, KeyboardInterrupt):
                xp.write_status("INTERRUPTED", traceback=None)
                xp.log(f"INTERRUPTED: {where}")
            elif (cancelled := slurm.cancelled_reason()) is not None:  # scancel: not coming back
                xp.write_status("CANCELLED", traceback=None, reason=cancelled)
                xp.log(f"CANCELLED: {cancelled}")
            else:  # a scheduler's preemption: the job is requeued
                xp.write_status("QUEUED", requeues=int(previous.get("requeues", 0)) + 1, traceback=None)
                xp.log(where)
            raise
        except BaseException:
            tb = traceback.format_exc() + distributed.peer_failures(xp.folder)
            record_failure(xp, tb)
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


def _run_rank(cfg: DictConfig, plain: tp.Dict[str, tp.Any], xp: Xp, device: torch.device,
              rank: distributed.Dist) -> tp.Dict[str, tp.Any]:
    """:func:`run` as one process of a data-parallel run: rank 0 runs it as a single process
    would (and alone writes the run folder); the others train in lockstep and write nothing but,
    if they fail, their traceback (``failure.rank<r>.txt``, gathered into rank 0's FAILED status)."""
    distributed.new_run()
    if rank.is_main:
        try:
            return _run_single(cfg, plain, xp, device, rank)
        except BaseException as exc:
            distributed.share_start(f"{type(exc).__name__}: {exc}")  # no-op once it was shared
            raise
    started = distributed.share_start(None)
    if started == "done":
        return xp.read_result() or {}
    if started != "start":
        raise RuntimeError(f"rank 0 did not start the run: {started}")
    task = _make_task(plain)
    try:
        seed_all(int(plain["seed"]))
        _setup_task(task, plain, device)
        _check_data(xp, task)
        metrics = _train_and_finish(plain, task, xp, device)
    except (Preempted, KeyboardInterrupt):
        raise
    except BaseException:
        try:
            io.write_text(xp.folder / f"failure.rank{rank.rank}.txt", traceback.format_exc())
        except OSError:
            pass
        raise
    return {"sig": xp.sig, "task": plain["task"]["name"], "quant": plain["quant"]["name"],
            "metric": task.metric, "metrics": metrics}


def record_failure(xp: Xp, tb: str) -> None:
    """status.json FAILED with the traceback, even on a full disk (the run folder's reserve is
    released first if the write fails, then the write is tried again)."""
    try:
        xp.write_status("FAILED", traceback=tb)
    except OSError:
        xp.release_reserve()
        xp.write_status("FAILED", traceback=tb)
    try:
        xp.log("FAILED\n" + tb)
    except OSError:
        pass  # the status holds the traceback; the log line is a convenience


#: exit codes of ``diffq-bench`` (docs/INTERFACES.md)
EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED, EXIT_INTERRUPTED = 1, 2, 3, 4


def _print_float_reference(cfg: DictConfig, result: tp.Mapping[str, tp.Any]) -> None:
    """After a single quantized run: one line comparing it with its task's float run, when the
    store has it (a sweep ends with its table instead)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN or not distributed.current().is_main:
        return
    line = reference_line(result, to_container(cfg), list(HydraConfig.get().overrides.task))
    if line is not None:
        print(line, flush=True)


def _hydra_task(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
        _print_float_reference(cfg, result)
    except ConfigError as exc:
        # Bad config: a one-line message, no traceback, non-zero exit (SystemExit passes Hydra).
        print(f"diffq-bench: config error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None
    except RunLockedError as exc:
        print(f"diffq-bench: {exc}; wait for it (diffq-bench-status) or stop it", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_LOCKED) from None
    except (Preempted, KeyboardInterrupt) as exc:
        if INTERRUPT.signum is None and not isinstance(exc, KeyboardInterrupt):
            raise  # a scheduler's preemption: the launcher's job side handles it
        where = str(exc).split(";")[0] if isinstance(exc, Preempted) else "interrupted"
        print(f"diffq-bench: {where}; rerun the same command to resume", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (DataMissingError, DataCorruptError, DataChangedError, LoadError, InitError) as exc:
        # The run is recorded FAILED (traceback in status.json); the user needs the path, not a stack.
        label = next((_ERROR_LABELS[k] for k in type(exc).__mro__ if k in _ERROR_LABELS), type(exc).__name__)
        print(f"diffq-bench: {label}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_FAILED) from None


_ERROR_LABELS = {DataMissingError: "data missing", DataCorruptError: "data corrupt",
                 DataChangedError: "data changed", LoadError: "cannot load", InitError: "init error"}


def main() -> None:
    """``diffq-bench [overrides]``: the Hydra app (single run or ``-m`` sweep)."""
    try:
        conf_dir = find_conf_dir()
        check_overrides(sys.argv[1:], conf_dir)  # one line for a typo, before Hydra's own messages
    except ConfigError as exc:
        print(f"diffq-bench: config error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    INTERRUPT.install()
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
    if not found and args.grid and args.grid not in group_options("grid"):
        print(f"diffq-bench-table: unknown grid {args.grid!r}: no conf/grid/{args.grid}.yaml and no run of it "
              f"under {Path(args.root) / 'xps'} (available: {', '.join(group_options('grid'))})", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
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
    # Run the importable module, not this __main__ copy: launchers pickle the task function, and a
    # by-reference pickle of diffq_bench.cli does not drag the signal handler's Event along.
    from diffq_bench import cli as _cli  # start-up: the module itself, imported by name

    _cli.main()
