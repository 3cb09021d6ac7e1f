"""``hydra/sweeper=grid``: named grids, command-line sweeps, and skipping work already done.

``diffq-bench -m +grid=table_lm seed=0,1`` expands ``grid.runs`` (see :mod:`diffq_bench.launch.plan`)
times the command-line sweeps, composes each run's config to get its signature, skips runs that are
DONE or whose job is still queued/running, and hands the rest to the launcher in ONE call (one
SLURM job array). Without ``+grid`` it behaves like Hydra's basic sweeper plus the skipping.
Failed runs are listed at the end and make the command exit non-zero.
"""

import logging
import sys
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from diffq_bench import io
from diffq_bench.config import ConfigError, validate
from diffq_bench.launch import plan
from diffq_bench.results.load import load_runs
from diffq_bench.results.report import sweep_table

log = logging.getLogger(__name__)


class SweepError(CompactHydraException):
    """A sweep that cannot launch, or whose runs failed: Hydra prints the message alone (no
    traceback of the sweeper) and exits 1."""


@dataclass
class GridSweeperConf:
    _target_: str = "hydra_plugins.diffq_bench.grid_sweeper.GridSweeper"
    # runs per launcher call; null = all in one call (one job array). Hydra's basic sweeper name.
    max_batch_size: tp.Optional[int] = None
    # check every run's config (diffq_bench.config.validate) before launching any
    validate: bool = True


ConfigStore.instance().store(group="hydra/sweeper", name="grid", node=GridSweeperConf,
                             provider="diffq_bench")


class GridSweeper(Sweeper):
    """Expand grids and command-line sweeps; launch only the runs that need work.

    Args:
        max_batch_size: runs per launcher call (None: all at once).
        validate: check each run's config with :func:`diffq_bench.config.validate` first, so a
            typo fails the sweep in seconds instead of failing every job on the cluster.
    """

    def __init__(self, max_batch_size: tp.Optional[int] = None, validate: bool = True) -> None:
        super().__init__()
        if max_batch_size is not None and max_batch_size <= 0:
            raise ValueError(f"hydra.sweeper.max_batch_size must be null or > 0, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.validate = validate
        self.config: tp.Optional[DictConfig] = None
        self.hydra_context: tp.Optional[HydraContext] = None
        self.launcher: tp.Optional[Launcher] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def _compose(self, overrides: tp.List[str]) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

    def sweep(self, arguments: tp.List[str]) -> tp.Any:
        assert self.config is not None and self.launcher is not None
        grid = OmegaConf.select(self.config, "grid", default=None)
        runs = name = None
        if grid is not None:
            name = str(OmegaConf.select(self.config, "grid.name", default="?"))
            raw = grid.get("runs")
            runs = OmegaConf.to_container(raw, resolve=False) if OmegaConf.is_config(raw) else raw
            if not runs:
                raise SweepError(f"grid {name!r} has no runs "
                                     "(expected grid.runs: a list of override mappings)")
        jobs = plan.expand_grid(runs, arguments, name or "grid")
        log.info("sweep%s: %d run(s) to consider", f" of grid {name}" if name else "", len(jobs))
        composed = [(job, self._compose(job)) for job in jobs]
        force = bool(OmegaConf.select(self.config, "runtime.force", default=False))
        planned = plan.plan(composed, force=force)
        plan.remember(planned)
        log.info("%s", plan.summary(planned))
        blocked = [p for p in planned if p.action == "blocked"]
        if blocked:
            raise SweepError(f"{len(blocked)} run(s) cannot start; nothing was launched:\n" + "\n".join(
                f"  {' '.join(p.overrides)}\n    {p.reason}" for p in blocked))

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        io.write_json(sweep_dir / "plan.json", [
            {"sig": p.sig, "action": p.action, "reason": p.reason, "overrides": p.overrides,
             "folder": str(p.folder)} for p in planned])

        todo = [p for p in planned if p.action == "launch"]
        if not todo:
            log.info("nothing to launch")
            self._print_table(planned, name)
            return []
        if self.validate:
            self._validate(todo, dict((tuple(job), cfg) for job, cfg in composed))
        size = self.max_batch_size or len(todo)
        returns: tp.List[tp.Sequence[JobReturn]] = []
        failed: tp.List[tp.Tuple[tp.Any, JobReturn]] = []
        for start in range(0, len(todo), size):
            batch = todo[start:start + size]
            try:
                results = self.launcher.launch([p.overrides for p in batch], initial_job_idx=start)
            except ConfigError as exc:  # a launcher's request that can only fail: one line, exit 2
                print(f"diffq-bench: config error: {exc}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None  # diffq_bench.cli.EXIT_CONFIG
            returns.append(results)
            failed += [(p, r) for p, r in zip(batch, results) if r.status == JobStatus.FAILED]
        if not any(r.status == JobStatus.UNKNOWN for batch in returns for r in batch):
            self._print_table(planned, name)  # (UNKNOWN: wait=false, the runs are still queued)
        # by name: Hydra's plugin discovery may load the launcher's modules a second time
        cancelled = [(p, r) for p, r in failed if type(r._return_value).__name__ == "RunCancelled"]
        failed = [(p, r) for p, r in failed if (p, r) not in cancelled]
        messages = []
        if failed:
            lines = [f"  {p.sig} ({p.folder}): {' '.join(p.overrides)}\n"
                     f"    {plan.failure_line(r._return_value)}" for p, r in failed]
            messages.append(f"{len(failed)} of {len(todo)} run(s) FAILED (tracebacks in each run's "
                            "status.json):\n" + "\n".join(lines))
        if cancelled:  # one line each: a cancel is a decision, not an error with a traceback
            messages.append(f"{len(cancelled)} of {len(todo)} run(s) CANCELLED (launch again to resume):\n"
                            + "\n".join(f"  {p.sig}: CANCELLED: {r._return_value}" for p, r in cancelled))
        if messages:
            raise SweepError("\n".join(messages))
        return returns

    def _print_table(self, planned: tp.Sequence[plan.PlannedRun], grid: tp.Optional[str]) -> None:
        """Print the table of the sweep's runs that have a result: the one ``diffq-bench-table``
        renders for them (:func:`diffq_bench.results.report.sweep_table`)."""
        results = load_runs([p.folder for p in planned])
        text = sweep_table(results, grid)
        if not text:
            return
        root = OmegaConf.select(self.config, "paths.root", default="outputs")
        again = (f"diffq-bench-table --root {root} --grid {grid}" if grid else
                 f"every run of the store: diffq-bench-table --root {root}")
        print(f"\nsweep table: {len(results)} of {len(planned)} run(s) finished ({again})\n\n{text}",
              end="" if text.endswith("\n") else "\n", flush=True)

    @staticmethod
    def _validate(todo: tp.Sequence[tp.Any], configs: tp.Dict[tp.Tuple[str, ...], DictConfig]) -> None:
        errors = []
        for item in todo:
            try:
                validate(plan.without_hydra(configs[tuple(item.overrides)]))
            except ConfigError as exc:
                errors.append(f"  {' '.join(item.overrides)}\n    {exc}")
        if errors:
            raise SweepError(f"{len(errors)} of {len(todo)} run(s) have an invalid config; nothing "
                                 "was launched:\n" + "\n".join(errors))
