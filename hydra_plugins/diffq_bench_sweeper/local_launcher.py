"""``hydra/launcher=local_parallel``: a sweep on this machine, at most ``max_parallel`` runs at once.

Each run is a separate process (submitit's local executor), so runs do not share a torch thread
pool or a CUDA context, and a crashing run does not take the sweep down. Failures are truthful as
with the SLURM launcher (the sweep lists them and exits non-zero); SIGTERM/USR2 make a run
checkpoint and stop, and the next sweep resumes it.
"""
import logging
import time
import typing as tp
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides

from .slurm_launcher import SlurmLauncher

log = logging.getLogger(__name__)


class LocalParallelLauncher(SlurmLauncher):
    """Run a sweep's jobs as local processes, ``max_parallel`` at a time (a sliding window).

    Args:
        max_parallel: runs executing at the same time (>= 1).
        submitit_folder: where submitit keeps each job's pickles and logs.
        timeout_min: a run still going after this many minutes is killed (FAILED).
        poll_s: seconds between checks for finished runs.
    """
    _EXECUTOR = "local"

    def __init__(self, max_parallel: int = 1, submitit_folder: str = ".submitit/%j",
                 timeout_min: int = 4320, poll_s: float = 1.0) -> None:
        if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
            raise ValueError(f"hydra.launcher.max_parallel must be an integer >= 1, got {max_parallel!r}")
        super().__init__(max_requeues=0, wait=True, submitit_folder=submitit_folder,
                         timeout_min=timeout_min)
        self.max_parallel = max_parallel
        self.poll_s = float(poll_s)

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
        running: tp.Dict[int, tp.Any] = {}
        results: tp.List[tp.Optional[JobReturn]] = [None] * len(job_overrides)
        log.info("running %d job(s) locally, at most %d at a time", len(todo), self.max_parallel)
        while todo or running:
            while todo and len(running) < self.max_parallel:
                pos, overrides = todo.pop(0)
                idx = initial_job_idx + pos
                log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
                running[pos] = executor.submit(self, list(overrides), "hydra.sweep.dir", idx,
                                               f"job_id_for_{idx}", Singleton.get_state())
            for pos, job in list(running.items()):
                if job.done():
                    results[pos] = self._outcome(job, list(job_overrides[pos]))
                    del running[pos]
            if running:
                time.sleep(self.poll_s)
        return tp.cast(tp.List[JobReturn], results)
