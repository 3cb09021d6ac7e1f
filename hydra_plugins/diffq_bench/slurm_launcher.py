"""``hydra/launcher=slurm``: hydra-submitit's SLURM launcher, made truthful and preemption-safe.

What this adds to ``hydra_plugins.hydra_submitit_launcher``:

- A multirun is one ``sbatch --array`` (submitit ``map_array``), and every job id is recorded in
  its run folder (``submissions.jsonl``) right after submission, so a second launch of the same
  grid does not resubmit runs that are still queued or running.
- The job side of :mod:`.job`: truthful failure (sacct FAILED), checkpoint on USR2/SIGTERM,
  bounded requeues (``max_requeues``).
- ``wait: false`` returns right after submission (check progress with ``diffq-bench-status``).
- ``dry_run: true`` prints the job arrays, each job's resources, the GPU-hours at most and the runs
  skipped, and submits nothing (:mod:`diffq_bench.launch.resources`).
- A request that can only fail is refused before anything is submitted (one line, exit 2): a run
  on ``device=cuda`` in jobs without a GPU, more tasks per node than GPUs; ``device=auto`` in jobs
  without a GPU is a warning (it trains on the CPU).
- A job that can never start (pending with ``PartitionConfig``, an invalid account or QOS, a node
  that does not exist...) is cancelled within seconds and the launch fails with the reason and the
  ``hydra.launcher`` key to change (also with ``wait: false``, which waits until the scheduler has
  placed or given a reason to each job, at most :data:`WATCH_UNTIL_S` seconds); a job cancelled by
  ``scancel`` makes its run CANCELLED.
"""

import logging
import sys
import time
import typing as tp
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

from diffq_bench.config import ConfigError
from diffq_bench.launch import plan, resources, slurm
from diffq_bench.xp import Xp
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from . import job

log = logging.getLogger(__name__)
#: seconds between checks of the submitted jobs' pending reasons
WATCH_POLL_S = 5.0
#: with ``wait: false``, at most this long the launcher waits for the scheduler to say whether the
#: jobs can start (usually a second or two)
WATCH_UNTIL_S = 20.0


class SlurmLauncher(BaseSubmititLauncher):
    """Submitit SLURM launcher with truthful exit codes, submission records and bounded requeues.

    Args:
        max_requeues: requeues allowed per submission (preemptions, timeouts, ``scontrol requeue``).
        wait: block until all jobs end (True) or return right after submission (False).
        dry_run: print what would be submitted (arrays, resources, GPU-hours, skipped runs) and
            submit nothing.
        params: hydra-submitit SLURM parameters (``partition``, ``timeout_min``, ``gpus_per_node``,
            ``cpus_per_task``, ``mem_gb``, ``array_parallelism``, ``setup``,
            ``additional_parameters``...); see conf/hydra/launcher/slurm.yaml.
    """
    _EXECUTOR = "slurm"

    def __init__(self, max_requeues: int = 3, wait: bool = True, dry_run: bool = False, **params: tp.Any) -> None:
        if int(max_requeues) < 0:
            raise ValueError(f"hydra.launcher.max_requeues must be >= 0, got {max_requeues}")
        super().__init__(**params)
        self.max_requeues = int(max_requeues)
        self.wait = bool(wait)
        self.dry_run = bool(dry_run)

    # ---------------------------------------------------------------- submitting side
    def _executor(self, after: tp.Optional[str] = None) -> tp.Any:
        """A submitit SLURM executor; ``after``: a job id these jobs wait for (``afterok``), and
        are cancelled by SLURM if it fails (``--kill-on-invalid-dep``)."""
        import submitit
        params = dict(self.params)
        folder = params.pop("submitit_folder")
        if not isinstance(params.get("timeout_min"), int):
            raise ValueError(f"hydra.launcher.timeout_min must be an integer number of minutes, "
                             f"got {params.get('timeout_min')!r}")
        params["additional_parameters"] = self._additional_parameters(after)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor = submitit.AutoExecutor(folder=folder, cluster=self._EXECUTOR)
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v
                                      for k, v in params.items() if v is not None})
        return executor

    def _additional_parameters(self, after: tp.Optional[str] = None) -> tp.Dict[str, tp.Any]:
        """``additional_parameters`` plus what every submission adds (``requeue``; ``afterok``)."""
        extra = dict(self.params.get("additional_parameters") or {})
        extra.setdefault("requeue", True)  # some clusters default to JobRequeue=0
        if after is not None:
            extra.update(dependency=f"afterok:{after}", kill_on_invalid_dep="yes")
        return extra

    def launch(self, job_overrides: tp.Sequence[tp.Sequence[str]], initial_job_idx: int) -> tp.Sequence[JobReturn]:
        """Submit the runs as job arrays: runs without a pending init run in one array, runs
        fine-tuned from a run of this launch (or from a queued one) in one array per such run,
        ``afterok`` on its job."""
        assert self.config is not None and len(job_overrides) > 0
        req = resources.request({**self.params, "additional_parameters": self._additional_parameters()})
        errors, warnings = resources.check(req, self._devices(job_overrides))
        if self.dry_run:
            print(self._dry_run(job_overrides, initial_job_idx, req, warnings), flush=True)
        else:
            for warning in warnings:
                log.warning("%s", warning)
        if errors:
            raise ConfigError("; ".join(errors))
        if self.dry_run:
            return [JobReturn(overrides=list(o), status=JobStatus.UNKNOWN) for o in job_overrides]
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        grid = OmegaConf.select(self.config, "grid.name", default=None)
        index = {tuple(o): idx for idx, o in enumerate(job_overrides, start=initial_job_idx)}
        submitted: tp.Dict[tp.Tuple[str, ...], tp.Any] = {}
        for wave in plan.in_dependency_order(job_overrides):
            groups: tp.Dict[tp.Optional[str], tp.List[tp.List[str]]] = {}
            for overrides in wave:
                dep = plan.dependency(overrides)
                after = None
                if dep is not None:
                    parent = submitted.get(dep.overrides) if dep.overrides else None
                    after = parent.job_id if parent is not None else dep.job_id
                groups.setdefault(after, []).append(overrides)
            for after, group in groups.items():
                params = []
                for overrides in group:
                    idx = index[tuple(overrides)]
                    log.info("\t#%d : %s%s", idx, " ".join(filter_overrides(overrides)),
                             f" (after job {after})" if after else "")
                    params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                                   Singleton.get_state()))
                jobs = self._executor(after).map_array(self, *zip(*params))
                for submitted_job, overrides in zip(jobs, group):
                    submitted[tuple(overrides)] = submitted_job
                    folder = plan.run_folder(overrides, lambda o: job.compose(self, o))
                    Xp.at(folder).record_submission(
                        submitted_job.job_id, sweep_dir=str(sweep_dir), grid=grid, cluster="slurm",
                        submitit_folder=str(submitted_job.paths.folder), after=after)
                log.info("submitted %d run(s) as SLURM job array %s%s (logs: %s)", len(jobs),
                         jobs[0].job_id.split("_")[0], f", afterok:{after}" if after else "",
                         jobs[0].paths.folder.parent)
        folders = {key: plan.run_folder(list(key), lambda o: job.compose(self, o)) for key in submitted}
        returns: tp.Dict[tp.Tuple[str, ...], JobReturn] = {}
        names = job.labels(job_overrides)
        reported: tp.List[tp.Tuple[str, ...]] = []

        def report(key: tp.Tuple[str, ...]) -> None:
            reported.append(key)
            job.report(returns[key], folders[key], names[key], len(reported), len(job_overrides),
                       submitted[key].paths.stderr)
        # a job that can never start (more CPUs than a node has, a missing node, account or QOS...)
        # is cancelled and fails the launch now, instead of a wait without end
        self._watch(submitted, folders, returns, WATCH_UNTIL_S if not self.wait else None)
        for key in returns:  # never started
            report(key)
        if not self.wait:
            return [returns.get(tuple(o), JobReturn(overrides=list(o), status=JobStatus.UNKNOWN))
                    for o in job_overrides]
        for overrides in (o for wave in plan.in_dependency_order(job_overrides) for o in wave):
            dep = plan.dependency(overrides)
            parent = returns.get(dep.overrides) if dep is not None and dep.overrides else None
            if tuple(overrides) in returns:  # never started: decided by _watch
                continue
            if parent is not None and parent.status == JobStatus.FAILED:
                # SLURM cancels it (kill-on-invalid-dep): record why, everywhere
                job.cancel(submitted[tuple(overrides)])
                returns[tuple(overrides)] = job.fail_unstarted(self, list(overrides), dep.sig)
            else:
                returns[tuple(overrides)] = job.outcome(submitted[tuple(overrides)], list(overrides),
                                                        folders[tuple(overrides)])
            report(tuple(overrides))
        return [returns[tuple(o)] for o in job_overrides]

    def _devices(self, job_overrides: tp.Sequence[tp.Sequence[str]]) -> tp.List[str]:
        """Each run's ``device`` (from the sweep's plan; composed when the run is not in it)."""
        planned = {tuple(p.overrides): p.device for p in plan.last_plan()}
        return [planned[tuple(o)] if tuple(o) in planned else
                str(OmegaConf.select(job.compose(self, o), "device", default="auto")) for o in job_overrides]

    def _dry_run(self, job_overrides: tp.Sequence[tp.Sequence[str]], initial_job_idx: int,
                 req: resources.Request, warnings: tp.Sequence[str]) -> str:
        """The report of ``dry_run: true``: the arrays launch() would submit, in its order."""
        index = {tuple(o): idx for idx, o in enumerate(job_overrides, start=initial_job_idx)}
        folders = {tuple(o): plan.run_folder(o, lambda c: job.compose(self, c)) for o in job_overrides}
        arrays: tp.List[tp.Tuple[str, tp.List[str]]] = []
        for wave in plan.in_dependency_order(job_overrides):
            groups: tp.Dict[str, tp.List[str]] = {}
            for overrides in wave:
                dep = plan.dependency(overrides)
                after = ""
                if dep is not None:
                    after = (f" (afterok: the job of #{index[dep.overrides]})" if dep.overrides in index
                             else f" (afterok: job {dep.job_id})")
                groups.setdefault(after, []).append(
                    f"#{index[tuple(overrides)]} {folders[tuple(overrides)].name} "
                    + " ".join(filter_overrides(list(overrides))))
            arrays += [(f"{len(arrays) + i + 1}{after}", lines) for i, (after, lines) in enumerate(groups.items())]
        skipped = [f"{p.sig} {p.action} ({p.reason}): {' '.join(p.overrides)}" for p in plan.last_plan()
                   if p.action != "launch"]
        return resources.dry_run_report(arrays, skipped, req, sys.executable, warnings)

    def _watch(self, submitted: tp.Mapping[tp.Tuple[str, ...], tp.Any],
               folders: tp.Mapping[tp.Tuple[str, ...], Path], returns: tp.Dict[tp.Tuple[str, ...], JobReturn],
               until_s: tp.Optional[float]) -> None:
        """Poll the submitted jobs until they all ended (``until_s`` None), or, with ``wait: false``,
        until each one started or got a pending reason from the scheduler (at most ``until_s``
        seconds): those PENDING for a reason that never resolves are cancelled, their runs FAILED
        with the reason and what to change (:func:`diffq_bench.launch.slurm.impossible_reason`)."""
        start = time.monotonic()
        waiting = {key: sub for key, sub in submitted.items()}
        while waiting and (until_s is None or time.monotonic() - start < until_s):
            waiting = {key: sub for key, sub in waiting.items() if not sub.done()}
            try:
                info = slurm.job_info([sub.job_id for sub in waiting.values()]) if waiting else {}
            except slurm.SlurmError as exc:
                log.warning("cannot check the pending jobs (%s)", exc)
                info = {}
            undecided = False
            for key, sub in list(waiting.items()):
                state, reason = info.get(str(sub.job_id), ("", ""))
                undecided |= state in ("", "PENDING") and reason in ("", "None")
                fix = slurm.impossible_reason(reason) if state == "PENDING" else None
                if fix is None:
                    continue
                error = job.NeverStarts(f"SLURM job {sub.job_id} can never start (pending, Reason={reason}): "
                                        f"{fix}; it was cancelled")
                job.cancel(sub)
                returns[key] = job.fail_never_started(list(key), folders[key], error)
                del waiting[key]
            if until_s is not None and not undecided:
                return  # wait: false: every job started or was given a reason by the scheduler
            if waiting:
                time.sleep(WATCH_POLL_S if until_s is None else 1.0)

    # ---------------------------------------------------------------- job side
    def __call__(self, sweep_overrides: tp.List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: tp.Dict[type, Singleton]) -> JobReturn:
        return job.run_truthfully(self, self.max_requeues, sweep_overrides, job_dir_key, job_num,
                                  job_id, singleton_state)
