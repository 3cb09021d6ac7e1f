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
import time
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
    return {jid: state for jid, (state, _) in _parse_rows(text).items()}


def _parse_rows(text: str) -> tp.Dict[str, tp.Tuple[str, str]]:
    """Lines ``raw_id|job_id|state[|reason]`` -> {id: (state, reason)} (both spellings of an array
    task's id; reason ``""`` when the line has none or SLURM says ``None``)."""
    rows: tp.Dict[str, tp.Tuple[str, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) not in (3, 4):
            continue
        raw, job, state = parts[:3]
        reason = parts[3].strip() if len(parts) == 4 else ""
        reason = "" if reason in ("None", "(null)") else reason
        # sacct writes "CANCELLED by 0"; keep the state word only
        state = state.strip().split(" ")[0].rstrip("+")
        ids = expand_job_ids(job)
        for jid in ids:
            rows[jid] = (state, reason)
        if len(ids) == 1 and raw.strip().isdigit():
            rows[raw.strip()] = (state, reason)  # array task 12_3 also answers to its own id (SLURM_JOB_ID)
    return rows


def job_states(job_ids: tp.Iterable[str]) -> tp.Dict[str, str]:
    """The scheduler's state of each job id (``PENDING``, ``RUNNING``, ``COMPLETED``, ``FAILED``...).

    ``squeue`` wins over ``sacct`` for jobs it still lists. Ids that neither tool knows are absent
    from the result (e.g. accounting disabled and the job long gone).

    Args:
        job_ids: ids as recorded by the run store (``"123"`` or ``"123_4"``).
    Raises:
        SlurmError: when the SLURM tools are missing or fail.
    """
    return {jid: state for jid, (state, _) in job_info(job_ids).items()}


def job_info(job_ids: tp.Iterable[str]) -> tp.Dict[str, tp.Tuple[str, str]]:
    """Like :func:`job_states`, with squeue's reason for each job (``PartitionConfig``,
    ``Resources``, ``BeginTime``...; ``""`` when it has none or squeue no longer lists it).

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
    rows = {jid: (state, "") for jid, (state, _) in _parse_rows(
        _run(["sacct", "-n", "-P", "-X", "-o", "JobIDRaw,JobID,State", "-j", bases])).items()}
    rows.update(_parse_rows(_run(["squeue", "-h", "-r", "-o", "%A|%i|%T|%r", "-j", bases])))
    return {j: rows[j] for j in wanted if j in rows}


#: pending reasons that never resolve by themselves: the job asks for something the cluster cannot
#: give (more CPUs/memory/GPUs/time than a partition or node has, a node, account, QOS or partition
#: that does not exist or is not allowed). Each maps to what to change.
IMPOSSIBLE_REASONS = {
    "PartitionConfig": "the request exceeds what the partition allows (CPUs, memory, GPUs or nodes): "
                       "lower hydra.launcher.cpus_per_task / mem_gb / gpus_per_node / nodes, or pick "
                       "another hydra.launcher.partition",
    "PartitionNodeLimit": "the partition has fewer nodes than requested: lower hydra.launcher.nodes",
    "PartitionTimeLimit": "the time limit exceeds the partition's MaxTime: lower hydra.launcher.timeout_min",
    "PartitionDown": "the partition is down: pick another hydra.launcher.partition",
    "PartitionInactive": "the partition is inactive: pick another hydra.launcher.partition",
    "ReqNodeNotAvail": "a requested node does not exist or is unavailable: check the nodelist/exclude "
                       "in hydra.launcher.additional_parameters",
    "BadConstraints": "no node satisfies the constraints: check hydra.launcher.constraint / "
                      "additional_parameters",
    "InvalidAccount": "the account is invalid: set hydra.launcher.additional_parameters.account",
    "InvalidQOS": "the QOS is invalid: set hydra.launcher.qos",
    "QOSJobLimit": "the QOS does not allow this job (time, CPUs or GPUs per job): lower the request "
                   "or set another hydra.launcher.qos",
    "AccountNotAllowed": "the account may not use this partition: set hydra.launcher.additional_parameters.account",
    "QOSNotAllowed": "the QOS may not use this partition: set hydra.launcher.qos",
    "JobHeldAdmin": "an administrator holds the job: ask them, or scancel it",
}


def impossible_reason(reason: str) -> tp.Optional[str]:
    """What to change when a PENDING job's ``reason`` can never resolve by itself (None otherwise).

    ``ReqNodeNotAvail`` counts only when it names no node that exists (SLURM writes it both for a
    node that is down for a while and for one that is not part of the cluster); squeue spells it
    ``ReqNodeNotAvail, UnavailableNodes:n1,n2`` or ``ReqNodeNotAvail,_May_be_reserved...``.
    """
    word = reason.split(",")[0].split(" ")[0].strip()
    if word == "ReqNodeNotAvail":
        return IMPOSSIBLE_REASONS[word] if not _names_existing_node(reason) else None
    return IMPOSSIBLE_REASONS.get(word)


def _names_existing_node(reason: str) -> bool:
    match = re.search(r"UnavailableNodes:([^ ]*)", reason)
    if not match or not match.group(1):
        return False  # no node list: a request for nodes that are not in the cluster
    try:
        _run(["scontrol", "show", "node", match.group(1)])
    except SlurmError:
        return False
    return True


def cancel(job_ids: tp.Iterable[str]) -> None:
    """``scancel`` the given job ids (array tasks as ``"123_4"``); already ended jobs are ignored.

    Raises:
        SlurmError: scancel failed.
    """
    ids = [str(j) for j in job_ids if j]
    if ids:
        _run(["scancel", *ids])


def accounting_state(job_id: str) -> tp.Optional[str]:
    """The job's state in accounting only (``sacct``): while a job is being stopped squeue says
    COMPLETING for a cancel, a requeue and a preemption alike; sacct already says CANCELLED,
    REQUEUED or PREEMPTED. None when unknown (no accounting, not a SLURM id)."""
    if not job_id or not _JOB_ID_RE.match(str(job_id)) or not shutil.which("sacct"):
        return None
    try:
        out = _run(["sacct", "-n", "-P", "-X", "-o", "JobIDRaw,JobID,State", "-j", str(job_id).split("_")[0]])
    except SlurmError:
        return None
    return _parse_table(out).get(str(job_id))


def cancelled_reason(job_id: tp.Optional[str] = None, wait_s: float = 3.0) -> tp.Optional[str]:
    """A one-line reason when SLURM job ``job_id`` (default: this process's job) was cancelled
    (``scancel``), None when it was not (requeue, preemption, time limit) or outside SLURM.

    Args:
        job_id: the job (array tasks as ``"123_4"``).
        wait_s: how long to wait for accounting to record why a RUNNING job is being stopped.
    """
    job_id = job_id or current_job_id()
    if not job_id:
        return None
    end = time.monotonic() + wait_s
    state = accounting_state(job_id)
    while state == "RUNNING" and time.monotonic() < end:
        time.sleep(0.25)
        state = accounting_state(job_id)
    if state == "CANCELLED":
        return f"SLURM job {job_id} was cancelled (scancel); the next launch resumes the run from its checkpoint"
    return None


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


