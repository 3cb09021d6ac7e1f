"""Small, dependency-free helpers around the SLURM command line tools.

The sweeper asks "is this job still queued or running?" before resubmitting a run, and the status
table shows the scheduler's view of each run next to the run store's. Both go through
:func:`job_states`, which combines ``squeue`` (authoritative for live jobs, sees array tasks that
have not started yet) and ``sacct`` (remembers finished jobs, needs accounting). Job ids are
strings: ``"123"`` for a plain job, ``"123_4"`` for task 4 of job array 123.

Inside a job, :func:`current_job_id` gives the same spelling from the environment and
:func:`requeue` puts the job back in the queue (what submitit does on a timeout).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import typing as tp

# States in which a job will still run (or is running): do not submit the same run again.
LIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING",
    "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT",
})
_ARRAY_RE = re.compile(r"^(\d+)_\[([^\]]+)\]$")
_JOB_ID_RE = re.compile(r"^\d+(_\d+)?$")
_TIMEOUT_S = 30


class SlurmError(RuntimeError):
    """A SLURM command failed (the message holds the command and its stderr)."""


def available() -> bool:
    """True when the SLURM client tools (``squeue``, ``sacct``, ``sbatch``) are on the PATH."""
    return all(shutil.which(tool) for tool in ("squeue", "sacct", "sbatch"))


def _run(cmd: tp.Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"{' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def expand_job_ids(spec: str) -> tp.List[str]:
    """Expand SLURM's compact array spelling: ``"12_[0-2,5%2]"`` -> ``["12_0", "12_1", "12_2", "12_5"]``.

    Args:
        spec: a job id as printed by ``squeue``/``sacct`` (plain ids are returned unchanged).
    """
    match = _ARRAY_RE.match(spec.strip())
    if not match:
        return [spec.strip()]
    base, ranges = match.groups()
    ranges = ranges.split("%")[0]  # "%2" is the array's parallelism limit, not an index
    out = []
    for part in ranges.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            step = 1
            if ":" in hi:
                hi, step_s = hi.split(":")
                step = int(step_s)
            out.extend(f"{base}_{i}" for i in range(int(lo), int(hi) + 1, step))
        elif part:
            out.append(f"{base}_{int(part)}")
    return out


def _parse_table(text: str) -> tp.Dict[str, str]:
    """Lines ``raw_id|job_id|state`` -> {id: state}, under both spellings of an array task's id."""
    states: tp.Dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 3:
            continue
        raw, job, state = parts
        # sacct writes "CANCELLED by 0"; keep the state word only
        state = state.strip().split(" ")[0].rstrip("+")
        ids = expand_job_ids(job)
        for jid in ids:
            states[jid] = state
        if len(ids) == 1 and raw.strip().isdigit():
            states[raw.strip()] = state  # array task 12_3 also answers to its own id (SLURM_JOB_ID)
    return states


def job_states(job_ids: tp.Iterable[str]) -> tp.Dict[str, str]:
    """The scheduler's state of each job id (``PENDING``, ``RUNNING``, ``COMPLETED``, ``FAILED``...).

    ``squeue`` wins over ``sacct`` for jobs it still lists. Ids that neither tool knows are absent
    from the result (e.g. accounting disabled and the job long gone).

    Args:
        job_ids: ids as recorded by the run store (``"123"`` or ``"123_4"``).
    Raises:
        SlurmError: when the SLURM tools are missing or fail.
    """
    # ids of other schedulers (or garbage) are not SLURM's: unknown, rather than a failing sacct
    wanted = sorted({str(j) for j in job_ids if j and _JOB_ID_RE.match(str(j))})
    if not wanted:
        return {}
    if not available():
        raise SlurmError("SLURM client tools (squeue, sacct, sbatch) are not on the PATH")
    # Both tools accept the array base id and list its tasks; ask by base id so pending array
    # tasks (listed compactly as 12_[0-3]) are found too.
    bases = ",".join(sorted({j.split("_")[0] for j in wanted}))
    states = _parse_table(_run(["sacct", "-n", "-P", "-X", "-o", "JobIDRaw,JobID,State", "-j", bases]))
    queued = _parse_table(_run(["squeue", "-h", "-r", "-o", "%A|%i|%T", "-j", bases]))
    states.update(queued)
    return {j: states[j] for j in wanted if j in states}


def is_live(state: tp.Optional[str]) -> bool:
    """True when ``state`` means the job is queued, running or about to run again."""
    return state in LIVE_STATES


def current_job_id() -> tp.Optional[str]:
    """The id of the SLURM job this process runs in (``"123_4"`` for array tasks), else None."""
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task_id:
        return f"{array_id}_{task_id}"
    return os.environ.get("SLURM_JOB_ID")


def restart_count() -> int:
    """How many times SLURM has requeued the current job (0 outside SLURM or on the first start)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def requeue(job_id: str) -> None:
    """Put ``job_id`` back in the queue (``scontrol requeue``); it restarts from the same script.

    Args:
        job_id: a job id (array tasks as ``"123_4"``).
    """
    _run(["scontrol", "requeue", str(job_id)])


