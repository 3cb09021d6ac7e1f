"""``hydra/launcher=local``: a sweep on this machine, at most ``max_parallel`` runs at once.

Each run is a separate process (submitit's local executor), so runs do not share a torch thread
pool or a CUDA context, and a crashing run does not take the sweep down. The job side is the one
of :mod:`.job`, as for SLURM: failures are truthful (the sweep lists them and exits non-zero);
SIGTERM/USR2 make a run checkpoint and stop, and the next sweep resumes it.

CPU threads: each run gets ``threads_per_job`` intra-op threads through ``OMP_NUM_THREADS``/
``MKL_NUM_THREADS``, which torch reads at start-up. The default is :func:`single_run_threads` //
``max_parallel`` (at least 1): the threads a single ``diffq-bench`` run started from the same shell
uses (``OMP_NUM_THREADS`` if set, else torch's default, one per physical core), shared among the
parallel runs. So ``max_parallel=1`` runs each job exactly like a single run, and a run resumed by
hand after a sweep (or the reverse) keeps its thread count. Without this every run starts one
thread per core, and two runs on two cores spend much of their time spinning against each other.
"""
import contextlib
import logging
import os
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides

from diffq_bench.checks import check_number
from diffq_bench.launch import plan
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from . import job

log = logging.getLogger(__name__)


class LocalParallelLauncher(BaseSubmititLauncher):
    """Run a sweep's jobs as local processes, ``max_parallel`` at a time (a sliding window).

    Args:
        max_parallel: runs executing at the same time (>= 1).
        submitit_folder: where submitit keeps each job's pickles and logs.
        timeout_min: a run still going after this many minutes is killed (FAILED).
        poll_s: seconds between checks for finished runs.
        threads_per_job: CPU threads of each run (None: :func:`single_run_threads` // max_parallel,
            at least 1).
    """
    _EXECUTOR = "local"

    def __init__(self, max_parallel: int = 1, submitit_folder: str = ".submitit/%j",
                 timeout_min: int = 4320, poll_s: float = 1.0,
                 threads_per_job: tp.Optional[int] = None) -> None:
        _check_count("max_parallel", max_parallel)
        if threads_per_job is not None:
            _check_count("threads_per_job", threads_per_job)
        super().__init__(submitit_folder=submitit_folder, timeout_min=timeout_min)
        self.max_parallel = max_parallel
        self.poll_s = float(poll_s)
        self.threads_per_job = threads_per_job or max(1, single_run_threads() // max_parallel)

    def _executor(self) -> tp.Any:
        import submitit
        executor = submitit.LocalExecutor(folder=self.params["submitit_folder"])
        executor.update_parameters(timeout_min=self.params["timeout_min"])
        return executor

    def launch(self, job_overrides: tp.Sequence[tp.Sequence[str]], initial_job_idx: int) -> tp.Sequence[JobReturn]:
        assert self.config is not None and len(job_overrides) > 0
        executor = self._executor()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        todo = list(enumerate(job_overrides))
        position = {tuple(o): pos for pos, o in todo}
        running: tp.Dict[int, tp.Any] = {}
        results: tp.List[tp.Optional[JobReturn]] = [None] * len(job_overrides)
        log.info("running %d job(s) locally, at most %d at a time, %d CPU thread(s) each",
                 len(todo), self.max_parallel, self.threads_per_job)
        folders = [plan.run_folder(o, lambda o: job.compose(self, o)) for o in job_overrides]
        names = job.labels(job_overrides)
        log.info("logs: each run's output in %s, its log.txt and status.json in %s",
                 str(self.params["submitit_folder"]).replace("%j", "<job id>"),
                 folders[0].parent / "<run>")
        finished = 0

        def report(pos: int, log_path: tp.Optional[Path] = None) -> None:
            nonlocal finished
            finished += 1
            ret = tp.cast(JobReturn, results[pos])
            job.report(ret, folders[pos], names[tuple(job_overrides[pos])], finished, len(job_overrides),
                       log_path)

        def waiting(overrides: tp.Sequence[str]) -> tp.Optional[int]:
            """Position of the unfinished init run this job waits for (None: ready)."""
            dep = plan.dependency(overrides)
            parent = position.get(dep.overrides) if dep is not None and dep.overrides else None
            return parent if parent is not None and results[parent] is None else None

        while todo or running:
            for pos, overrides in list(todo):  # children of a failed init run fail without starting
                dep = plan.dependency(overrides)
                parent = position.get(dep.overrides) if dep is not None and dep.overrides else None
                if parent is not None and results[parent] is not None and \
                        results[parent].status == JobStatus.FAILED:
                    todo.remove((pos, overrides))
                    results[pos] = job.fail_unstarted(self, list(overrides), dep.sig)
                    report(pos)
            ready = [item for item in todo if waiting(item[1]) is None]
            while ready and len(running) < self.max_parallel:
                pos, overrides = ready.pop(0)
                todo.remove((pos, overrides))
                idx = initial_job_idx + pos
                log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
                with _thread_env(self.threads_per_job):  # submitit copies os.environ at submit
                    running[pos] = executor.submit(self, list(overrides), "hydra.sweep.dir", idx,
                                                   f"job_id_for_{idx}", Singleton.get_state())
            for pos, submitted in list(running.items()):
                if submitted.done():
                    results[pos] = job.outcome(submitted, list(job_overrides[pos]))
                    del running[pos]
                    report(pos, submitted.paths.stderr)
            if running or todo:
                time.sleep(self.poll_s)
        _remove_empty_placeholder(Path(executor.folder))
        return tp.cast(tp.List[JobReturn], results)

    def __call__(self, sweep_overrides: tp.List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: tp.Dict[type, Singleton]) -> JobReturn:
        # a local job is never requeued: a preempted run exits and the next sweep resumes it
        return job.run_truthfully(self, 0, sweep_overrides, job_dir_key, job_num, job_id,
                                  singleton_state)


def _remove_empty_placeholder(folder: Path) -> None:
    """submitit leaves the job folder's pattern itself (``.submitit/%j``) as an empty folder beside
    the real job folders; remove it when it is empty (a user looking for logs opens it first)."""
    if "%j" in folder.name and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def single_run_threads() -> int:
    """The intra-op threads a single run started from this environment uses: ``OMP_NUM_THREADS``
    when it is a positive integer, else what a fresh torch process picks (one thread per physical
    core; asked of a child process, since this one may have changed its own count)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        return max(1, int(out.strip()))
    except (OSError, ValueError, subprocess.SubprocessError):
        return os.cpu_count() or 1


def _check_count(key: str, value: tp.Any) -> None:
    check_number(f"hydra.launcher.{key}", value, 1, integer=True)


@contextlib.contextmanager
def _thread_env(threads: int) -> tp.Iterator[None]:
    """Set the thread-count variables torch/OpenMP/MKL read at start-up, restoring them after."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({key: str(threads) for key in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
