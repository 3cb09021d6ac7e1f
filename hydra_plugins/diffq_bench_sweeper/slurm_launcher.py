"""``hydra/launcher=slurm``: hydra-submitit's SLURM launcher, made truthful and preemption-safe.

What this adds to ``hydra_plugins.hydra_submitit_launcher``:

- A multirun is one ``sbatch --array`` (submitit ``map_array``), and every job id is recorded in
  its run folder (``submissions.jsonl``) right after submission, so a second launch of the same
  grid does not resubmit runs that are still queued or running.
- Truthful failure: hydra-submitit returns Hydra's ``JobReturn(status=FAILED)`` as a normal
  result, so SLURM records COMPLETED. Here the job re-raises the run's exception: submitit stores
  the traceback, the process exits non-zero and ``sacct`` says FAILED (the run's own status.json
  already holds FAILED and the traceback, written by the run itself).
- Preemption and timeouts: USR2 (sent ``signal_delay_s`` before the time limit, or at preemption)
  and SIGTERM (``scontrol requeue``, preemption without signal, cancellation) set
  :data:`diffq_bench.train.PREEMPT`; the training loop checkpoints at the next step and raises
  ``Preempted``. After USR2 the job requeues itself (as submitit does); after SIGTERM SLURM
  already handles the job, which just exits. A requeued job resumes from its checkpoint. At most
  ``max_requeues`` requeues per submission (SLURM's restart count); beyond that the run is FAILED.
- ``wait: false`` returns right after submission (check progress with ``diffq-bench-status``).
"""

import logging
import signal
import sys
import typing as tp
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class RequeueLimitError(RuntimeError):
    """The run was requeued (preempted / timed out) more often than ``max_requeues`` allows."""


class _PreemptSignals:
    """Signal handlers that ask the training loop to checkpoint and stop (never exit mid-step)."""

    def __init__(self) -> None:
        self.received: tp.Optional[int] = None

    def install(self, usr_signal: int) -> None:
        for signum in {usr_signal, signal.SIGTERM}:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: tp.Any) -> None:
        from diffq_bench.train import PREEMPT
        # The first signal decides what happens next (a self-requeue after USR2 sends a TERM too).
        if self.received is None:
            self.received = signum
        PREEMPT.set()
        log.warning("received %s: checkpointing at the next step", signal.Signals(signum).name)


class SlurmLauncher(BaseSubmititLauncher):
    """Submitit SLURM launcher with truthful exit codes, submission records and bounded requeues.

    Args:
        max_requeues: requeues allowed per submission (preemptions, timeouts, ``scontrol requeue``).
        wait: block until all jobs end (True) or return right after submission (False).
        params: hydra-submitit SLURM parameters (``partition``, ``timeout_min``, ``gpus_per_node``,
            ``cpus_per_task``, ``mem_gb``, ``array_parallelism``, ``setup``,
            ``additional_parameters``...); see conf/hydra/launcher/slurm.yaml.
    """
    _EXECUTOR = "slurm"

    def __init__(self, max_requeues: int = 3, wait: bool = True, **params: tp.Any) -> None:
        if int(max_requeues) < 0:
            raise ValueError(f"hydra.launcher.max_requeues must be >= 0, got {max_requeues}")
        super().__init__(**params)
        self.max_requeues = int(max_requeues)
        self.wait = bool(wait)

    # ---------------------------------------------------------------- submitting side
    def _executor(self) -> tp.Any:
        import submitit
        params = dict(self.params)
        folder = params.pop("submitit_folder")
        if not isinstance(params.get("timeout_min"), int):
            raise ValueError(f"hydra.launcher.timeout_min must be an integer number of minutes, "
                             f"got {params.get('timeout_min')!r}")
        extra = dict(params.pop("additional_parameters", None) or {})
        extra.setdefault("requeue", True)  # some clusters default to JobRequeue=0
        params["additional_parameters"] = extra
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor = submitit.AutoExecutor(folder=folder, cluster=self._EXECUTOR)
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v
                                      for k, v in params.items() if v is not None})
        return executor

    def _compose(self, overrides: tp.List[str]) -> tp.Any:
        assert self.hydra_context is not None and self.config is not None
        return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

    def launch(self, job_overrides: tp.Sequence[tp.Sequence[str]], initial_job_idx: int) -> tp.Sequence[JobReturn]:
        from diffq_bench import sweep
        assert self.config is not None and len(job_overrides) > 0
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        grid = OmegaConf.select(self.config, "grid.name", default=None)
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                               Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))
        for job, overrides in zip(jobs, job_overrides):
            folder = sweep.run_folder(overrides, self._compose)
            sweep.record_submission(folder, job.job_id, sweep_dir=str(sweep_dir), grid=grid,
                                    cluster="slurm", submitit_folder=str(job.paths.folder))
        array_id = jobs[0].job_id.split("_")[0]
        log.info("submitted %d run(s) as SLURM job array %s (logs: %s)", len(jobs), array_id,
                 jobs[0].paths.folder.parent)
        if not self.wait:
            return [JobReturn(overrides=list(o), status=JobStatus.UNKNOWN) for o in job_overrides]
        return [self._outcome(job, list(o)) for job, o in zip(jobs, job_overrides)]

    @staticmethod
    def _outcome(job: tp.Any, overrides: tp.List[str]) -> JobReturn:
        try:
            return job.results()[0]
        except Exception as exc:  # noqa: BLE001 - FailedJobError / UncompletedJobError / pickling
            from diffq_bench.sweep import failure_line
            log.error("job %s (%s) failed: %s", job.job_id, " ".join(overrides), failure_line(exc))
            return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=exc)

    # ---------------------------------------------------------------- job side
    def __call__(self, sweep_overrides: tp.List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: tp.Dict[type, Singleton]) -> JobReturn:
        import submitit
        from diffq_bench import slurm

        signals = _PreemptSignals()
        signals.install(submitit.JobEnvironment._usr_sig())
        restarts = slurm.restart_count()
        if restarts > self.max_requeues:
            self._fail_run(sweep_overrides, singleton_state, RequeueLimitError(
                f"job {slurm.current_job_id()} was requeued {restarts} times; max_requeues="
                f"{self.max_requeues} (hydra.launcher.max_requeues)"))
        try:
            ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        except SystemExit as exc:
            if exc.code in (0, None):
                raise
            # e.g. a config error: turn the exit into an error result so the launcher sees it now
            raise RuntimeError(f"run exited with code {exc.code} (see the job's stderr)") from exc
        if ret.status != JobStatus.FAILED:
            return ret
        error = ret._return_value
        # train (and torch) is imported by the run itself; if it never was, nothing was preempted
        train = sys.modules.get("diffq_bench.train")
        if train is None or not isinstance(error, train.Preempted):
            raise error  # non-zero exit: SLURM records FAILED; the traceback is in status.json
        if signals.received == signal.SIGTERM:
            log.warning("stopped by SLURM (requeue, preemption or cancel) after checkpointing")
            raise SystemExit(-1)  # no result file: the launcher keeps waiting for the requeued job
        if restarts >= self.max_requeues:
            self._fail_run(sweep_overrides, singleton_state, RequeueLimitError(
                f"preempted or timed out after {restarts} requeues; max_requeues={self.max_requeues} "
                "(hydra.launcher.max_requeues)"))
        jid = slurm.current_job_id()
        if jid is None:  # a local job: nobody requeues it; the next sweep resumes the checkpoint
            raise error
        try:
            slurm.requeue(jid)
        except slurm.SlurmError as exc:
            # e.g. preemption: SLURM may already be requeuing the job. Exit without a result either
            # way (an error result would be read by the launcher as this run's final outcome).
            log.warning("scontrol requeue %s failed (%s); leaving the job to SLURM", jid, exc)
            raise SystemExit(-1)
        log.warning("checkpointed and requeued job %s (restart %d of at most %d)", jid, restarts + 1,
                    self.max_requeues)
        raise SystemExit(-1)

    def _fail_run(self, overrides: tp.List[str], singleton_state: tp.Dict[type, Singleton],
                  error: Exception) -> tp.NoReturn:
        """Mark the run FAILED in its status.json, then raise ``error`` (non-zero exit)."""
        from hydra.core.utils import setup_globals
        from diffq_bench.sweep import without_hydra
        from diffq_bench.xp import Xp
        Singleton.set_state(singleton_state)
        setup_globals()
        cfg = without_hydra(self._compose(list(overrides)))
        xp = Xp(cfg.paths.root, cfg)
        if xp.folder.exists():
            xp.write_status("FAILED", traceback=f"{type(error).__name__}: {error}")
            xp.log(f"FAILED: {error}")
        raise error
