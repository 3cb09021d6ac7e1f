"""Command-line entry points: ``diffq-bench`` (Hydra app), ``diffq-bench-table``, ``diffq-bench-status``.

Only wiring lives here: validate the config, open the run folder, skip finished runs, call the
training loop, record the outcome (result.json / status.json) and print the result row.
"""
from __future__ import annotations

import logging
import sys
import traceback
import typing as tp

from omegaconf import DictConfig

from .data.errors import DataMissingError
from .config import ConfigError, find_conf_dir, to_container, validate
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
        cells.append("-" if value is None else f"{value:.4g}" if key != "wall_time_s" else f"{value:.1f}")
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      "| " + " | ".join(str(c) for c in cells) + " |"])


def run(cfg: DictConfig) -> tp.Dict[str, tp.Any]:
    """Run (or resume, or just report) the experiment described by ``cfg``; returns result.json's dict.

    Args:
        cfg: the composed config.
    Raises:
        ConfigError: invalid config (raised before any folder or data is touched).
    """
    from .checkpoint import seed_all
    from .tasks import get_task
    from .finish import finish
    from .train import Preempted, Trainer, resolve_device
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
        status = xp.start_attempt(grids)
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
        raise SystemExit(2)
    except DataMissingError as exc:
        # The run is recorded FAILED (traceback in status.json); the user needs the path, not a stack.
        print(f"diffq-bench: data missing: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1)


def main() -> None:
    """``diffq-bench [overrides]``: the Hydra app (single run or ``-m`` sweep)."""
    import hydra
    try:
        conf_dir = find_conf_dir()
    except ConfigError as exc:
        print(f"diffq-bench: {exc}", file=sys.stderr)
        raise SystemExit(2)
    hydra.main(config_path=str(conf_dir), config_name="config", version_base="1.3")(_hydra_task)()


def table_main() -> None:
    """``diffq-bench-table``: collect run folders into one table (see :mod:`diffq_bench.results`)."""
    from . import results
    results.main()


def status_main() -> None:
    """``diffq-bench-status``: state of the runs in the store (see ``diffq_bench.status``)."""
    try:
        from . import status  # type: ignore[attr-defined]
    except ImportError as exc:
        print(f"diffq-bench-status is not available in this version ({exc})", file=sys.stderr)
        raise SystemExit(2)
    status.main()


if __name__ == "__main__":
    main()
