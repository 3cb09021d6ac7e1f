"""The job side shared by diffq-bench's launchers: what runs inside a submitted job.

Both launchers (:mod:`.slurm_launcher`, :mod:`.local_launcher`) submit themselves to a submitit
executor, as hydra-submitit does; their ``__call__`` runs :func:`run_truthfully`, which adds to
hydra-submitit's job:

- truthful failure: hydra-submitit returns ``JobReturn(status=FAILED)`` as a normal result, so
  SLURM records COMPLETED. Here the run's exception is re-raised: submitit stores the traceback,
  the process exits non-zero and ``sacct`` says FAILED (the run's own status.json already holds
  FAILED and the traceback);
- preemption: USR2 (time limit, or preemption with a signal) and SIGTERM set
  :data:`diffq_bench.train.PREEMPT`; the loop checkpoints at the next step and raises
  ``Preempted``. Under SLURM the job is then requeued (after USR2 by itself, as submitit does;
  after SIGTERM SLURM already handles it), at most ``max_requeues`` times per submission
  (``SLURM_RESTART_COUNT``); beyond that the run is FAILED. A local job just exits: the next
  sweep resumes its checkpoint.
"""
import logging
import signal
import typing as tp
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals

from diffq_bench.io import LoadError
from diffq_bench.launch import plan, slurm
from diffq_bench.results.report import format_line
from diffq_bench.train import PREEMPT, Preempted
from diffq_bench.xp import Xp
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

log = logging.getLogger(__name__)


class RequeueLimitError(RuntimeError):
    """The run was requeued (preempted / timed out) more often than ``max_requeues`` allows."""


class PreemptSignals:
    """Signal handlers that ask the training loop to checkpoint and stop (never exit mid-step)."""

    def __init__(self) -> None:
        self.received: tp.Optional[int] = None

    def install(self, usr_signal: int) -> None:
        for signum in {usr_signal, signal.SIGTERM}:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: tp.Any) -> None:
        # The first signal decides what happens next (a self-requeue after USR2 sends a TERM too).
        if self.received is None:
            self.received = signum
        PREEMPT.set()
        log.warning("received %s: checkpointing at the next step", signal.Signals(signum).name)


def compose(launcher: BaseSubmititLauncher, overrides: tp.Sequence[str]) -> tp.Any:
    """The full config of one job of ``launcher``'s sweep."""
    assert launcher.hydra_context is not None and launcher.config is not None
    return launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))


def fail_run(launcher: BaseSubmititLauncher, overrides: tp.List[str],
             singleton_state: tp.Dict[type, Singleton], error: Exception) -> tp.NoReturn:
    """Mark the run FAILED in its status.json, then raise ``error`` (non-zero exit)."""
    Singleton.set_state(singleton_state)
    setup_globals()
    cfg = plan.without_hydra(compose(launcher, overrides))
    xp = Xp(cfg.paths.root, cfg)
    if xp.folder.exists():
        xp.write_status("FAILED", traceback=f"{type(error).__name__}: {error}")
        xp.log(f"FAILED: {error}")
    raise error


def run_truthfully(launcher: BaseSubmititLauncher, max_requeues: int, sweep_overrides: tp.List[str],
                   job_dir_key: str, job_num: int, job_id: str,
                   singleton_state: tp.Dict[type, Singleton]) -> JobReturn:
    """Run one job of ``launcher`` (hydra-submitit's job) with truthful failure and bounded
    requeues (module docstring)."""
    import submitit

    signals = PreemptSignals()
    signals.install(submitit.JobEnvironment._usr_sig())
    restarts = slurm.restart_count()
    if restarts > max_requeues:
        fail_run(launcher, sweep_overrides, singleton_state, RequeueLimitError(
            f"job {slurm.current_job_id()} was requeued {restarts} times; max_requeues="
            f"{max_requeues} (hydra.launcher.max_requeues)"))
    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        # one SLURM task per process of a data-parallel run (hydra.launcher.tasks_per_node x
        # nodes): torch.distributed's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
        # from SLURM's, as torchrun would set them
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    try:
        ret = BaseSubmititLauncher.__call__(launcher, sweep_overrides, job_dir_key, job_num, job_id,
                                            singleton_state)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        # e.g. a config error: turn the exit into an error result so the launcher sees it now
        raise RuntimeError(f"run exited with code {exc.code} (see the job's stderr)") from exc
    if ret.status != JobStatus.FAILED:
        return ret
    error = ret._return_value
    if not isinstance(error, Preempted):
        raise error  # non-zero exit: SLURM records FAILED; the traceback is in status.json
    if signals.received == signal.SIGTERM:
        # scancel: cli.run recorded CANCELLED and the launcher reports it; requeue or preemption:
        # no result file, so the launcher keeps waiting for the requeued job
        log.warning("stopped by SLURM (requeue, preemption or cancel) after checkpointing")
        raise SystemExit(-1)
    if restarts >= max_requeues:
        fail_run(launcher, sweep_overrides, singleton_state, RequeueLimitError(
            f"preempted or timed out after {restarts} requeues; max_requeues={max_requeues} "
            "(hydra.launcher.max_requeues)"))
    jid = slurm.current_job_id()
    if env.global_rank != 0:  # one process of a multi-task job: rank 0 requeues the job
        raise SystemExit(-1)
    if jid is None:  # a local job: nobody requeues it; the next sweep resumes the checkpoint
        raise error
    try:
        slurm.requeue(jid)
    except slurm.SlurmError as exc:
        # e.g. preemption: SLURM may already be requeuing the job. Exit without a result either
        # way (an error result would be read by the launcher as this run's final outcome).
        log.warning("scontrol requeue %s failed (%s); leaving the job to SLURM", jid, exc)
        raise SystemExit(-1) from None
    log.warning("checkpointed and requeued job %s (restart %d of at most %d)", jid, restarts + 1,
                max_requeues)
    raise SystemExit(-1)


def fail_unstarted(launcher: BaseSubmititLauncher, overrides: tp.List[str], parent: str) -> JobReturn:
    """A run that never started because its init run ``parent`` failed: FAILED in its status.json
    (with the reason) and as the sweep's result."""
    error = RuntimeError(f"init run {parent} FAILED, so this run was not started; fix that run and "
                         "launch the sweep again")
    folder = plan.run_folder(overrides, lambda o: compose(launcher, o))
    xp = Xp.at(folder)
    folder.mkdir(parents=True, exist_ok=True)
    xp.write_status("FAILED", traceback=f"{type(error).__name__}: {error}")
    xp.log(f"FAILED: {error}")
    log.debug("not started (%s): %s", " ".join(overrides), error)  # reported by the launcher
    return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=error)


def fail_never_started(overrides: tp.List[str], folder: Path, error: Exception) -> JobReturn:
    """A run whose job was cancelled because it could never start: FAILED in its status.json (with
    the reason) and as the sweep's result."""
    xp = Xp.at(folder)
    xp.write_status("FAILED", traceback=f"{type(error).__name__}: {error}")
    xp.log(f"FAILED: {error}")
    log.debug("not started (%s): %s", " ".join(overrides), error)  # reported by the launcher
    return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=error)


def cancel(job: tp.Any) -> None:
    """Cancel a submitted job that must not run (its dependency failed); ignore one that ended."""
    try:
        job.cancel(check=False)
    except Exception as exc:  # noqa: BLE001 - best effort: SLURM may have cancelled it already
        log.warning("could not cancel job %s: %s", job.job_id, exc)


class RunCancelled(RuntimeError):
    """The run's job was cancelled (``scancel``): the run is CANCELLED and resumes at the next launch."""


class NeverStarts(RuntimeError):
    """The run's job was pending for a reason that cannot resolve by itself; it was cancelled."""


def outcome(job: tp.Any, overrides: tp.List[str], folder: tp.Optional[Path] = None) -> JobReturn:
    """The ``JobReturn`` of a finished submitit job; a failed job becomes a FAILED return naming
    its exception line, a cancelled one (``scancel``) a FAILED return holding :class:`RunCancelled`,
    with its run folder's status.json CANCELLED (written here when the job never got to)."""
    try:
        return job.results()[0]
    except Exception as exc:  # noqa: BLE001 - FailedJobError / UncompletedJobError / pickling
        cancelled = _cancelled(job, folder)
        if cancelled is not None:
            log.debug("job %s (%s) was cancelled: %s", job.job_id, " ".join(overrides), cancelled)
            return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=RunCancelled(cancelled))
        log.debug("job %s (%s) failed: %s", job.job_id, " ".join(overrides), plan.failure_line(exc))
        return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=exc)


def _cancelled(job: tp.Any, folder: tp.Optional[Path]) -> tp.Optional[str]:
    """The one-line reason when ``job`` ended by ``scancel`` (None otherwise); makes the run's
    status.json say CANCELLED with it."""
    xp = Xp.at(folder) if folder is not None else None
    try:
        status = (xp.read_status() if xp is not None else None) or {}
    except ValueError:  # a corrupt status.json: decided by the scheduler alone
        status = {}
    if status.get("state") == "CANCELLED" and status.get("job_id") == str(job.job_id):
        return str(status.get("reason") or f"SLURM job {job.job_id} was cancelled")
    reason = slurm.cancelled_reason(str(job.job_id), wait_s=0)
    if reason is None:
        return None
    if xp is not None and status.get("state") not in ("DONE", "FAILED"):
        if status.get("state") != "RUNNING":
            reason = f"SLURM job {job.job_id} was cancelled (scancel) before the run started"
        xp.write_status("CANCELLED", traceback=None, reason=reason)
        xp.log(f"CANCELLED: {reason}")
    return reason


def labels(job_overrides: tp.Sequence[tp.Sequence[str]]) -> tp.Dict[tp.Tuple[str, ...], str]:
    """A short name of each job of a sweep: the overrides that are not the same in every job
    (``seed=1 quant=qat``), or all of them when there is one job (``paths.*`` left out)."""
    keys = [tuple(o) for o in job_overrides]
    shared = set.intersection(*(set(k) for k in keys)) if len(keys) > 1 else set()
    return {key: " ".join(o for o in filter_overrides(list(key)) if o not in shared
                          and not o.startswith("paths.")) for key in keys}


def report(ret: JobReturn, folder: Path, label: str, finished: int, total: int,
           log_path: tp.Optional[Path] = None) -> None:
    """Print one line for a run of a sweep that has just finished: ``[k/N] DONE <label> <sig> |
    <its result row>`` (:func:`diffq_bench.results.report.format_line`), or FAILED / CANCELLED
    with the error line and where its log is."""
    where = f"[{finished}/{total}]"
    error = ret._return_value if ret.status == JobStatus.FAILED else None
    if error is None:
        try:
            result = Xp.at(folder).read_result() or {}
        except (OSError, LoadError) as exc:
            result = {}
            log.warning("cannot read the result of %s: %s", folder, exc)
        row = format_line(result)
        log.info("%s DONE %s %s%s", where, label, folder.name, f" | {row}" if row else "")
        return
    state = "CANCELLED" if type(error).__name__ == "RunCancelled" else "FAILED"
    line = str(error) if state == "CANCELLED" else plan.failure_line(error)
    log.error("%s %s %s %s | %s%s", where, state, label, folder.name, line,
              f" | log: {log_path}" if log_path is not None else f" | {folder / 'status.json'}")
