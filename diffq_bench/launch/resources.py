"""What a SLURM submission asks for, checked against the runs it carries, and its dry run.

The SLURM launcher (``hydra/launcher=slurm``) passes its ``hydra.launcher`` keys here before it
submits anything. :func:`check` refuses a request that can only fail (a run on ``device=cuda`` in a
job without a GPU, more processes per node than GPUs) and warns about one that silently trains
somewhere else than meant (``device=auto`` without a GPU: on the CPU). :func:`dry_run_report` is
what ``hydra.launcher.dry_run=true`` prints instead of submitting: the job arrays, the resources
of each job, the GPU-hours at most, and the runs skipped because they are done or queued.
"""
from __future__ import annotations

import dataclasses
import typing as tp

from ..config import ConfigError


@dataclasses.dataclass
class Request:
    """One job's resources, from the ``hydra.launcher`` keys (conf/hydra/launcher/slurm.yaml)."""
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0          # 0: no GPU (gpus_per_node null and no GPU in gres/gpus_per_task)
    cpus_per_task: tp.Optional[int] = None
    mem_gb: tp.Optional[float] = None
    timeout_min: int = 60
    partition: tp.Optional[str] = None
    array_parallelism: int = 256
    other: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict)  # qos, account, sbatch extras
    setup: tp.List[str] = dataclasses.field(default_factory=list)

    @property
    def hours(self) -> float:
        """The time limit in hours."""
        return self.timeout_min / 60


def gres_gpus(gres: tp.Any) -> int:
    """GPUs per node in a ``--gres`` value: ``gpu:4`` and ``gpu:a100:4`` -> 4, ``gpu`` -> 1,
    ``gpu:2,tmpdisk:100`` -> 2; 0 when it asks for no GPU."""
    total = 0
    for part in str(gres or "").split(","):
        fields = part.strip().split(":")  # gpu[:type][:count]
        if fields[0] == "gpu":
            total += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return total


def gpus_per_node(params: tp.Mapping[str, tp.Any]) -> int:
    """GPUs each node of a job gets: ``gpus_per_node``, else ``gpus_per_task`` x ``tasks_per_node``,
    else a GPU ``gres``; each also read from ``additional_parameters`` (any of ``-``/``_``).

    Args:
        params: the ``hydra.launcher`` keys.
    """
    extra = {str(k).replace("-", "_"): v for k, v in dict(params.get("additional_parameters") or {}).items()}
    tasks = int(params.get("tasks_per_node") or extra.get("ntasks_per_node") or 1)
    for source in (params, extra):
        for key in ("gpus_per_node", "gpus"):
            if source.get(key) not in (None, ""):
                return _count(source[key])
        if source.get("gpus_per_task") not in (None, ""):
            return _count(source["gpus_per_task"]) * tasks
        if source.get("gres") not in (None, ""):
            return gres_gpus(source["gres"])
    return 0


def _count(value: tp.Any) -> int:
    """``4`` or ``"a100:4"`` (sbatch's ``--gpus-per-node=[type:]N``) -> 4."""
    text = str(value).rsplit(":", 1)[-1]
    return int(text) if text.isdigit() else 1


#: launcher keys shown as the job's resources (the rest of ``other`` is printed as sbatch extras)
_SHOWN = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min",
          "partition", "array_parallelism", "setup", "additional_parameters")
#: launcher keys that are not sbatch resources
_NOT_RESOURCES = ("submitit_folder", "name", "stderr_to_stdout", "signal_delay_s", "max_num_timeout",
                  "_target_")


def request(params: tp.Mapping[str, tp.Any]) -> Request:
    """The :class:`Request` of the ``hydra.launcher`` keys ``params``.

    Raises:
        ConfigError: ``timeout_min`` is not an integer (sbatch's ``--time`` in minutes).
    """
    timeout = params.get("timeout_min", 60)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
        raise ConfigError(f"hydra.launcher.timeout_min must be an integer number of minutes >= 1, got {timeout!r}")
    other = {k: v for k, v in params.items() if k not in _SHOWN and k not in _NOT_RESOURCES
             and v not in (None, "", [], {})}
    other.update({f"--{k}": v for k, v in dict(params.get("additional_parameters") or {}).items()})
    return Request(nodes=int(params.get("nodes") or 1), tasks_per_node=int(params.get("tasks_per_node") or 1),
                   gpus_per_node=gpus_per_node(params), cpus_per_task=params.get("cpus_per_task"),
                   mem_gb=params.get("mem_gb"), timeout_min=timeout,
                   partition=params.get("partition"), array_parallelism=int(params.get("array_parallelism") or 256),
                   other=other, setup=[str(line) for line in params.get("setup") or []])


def check(req: Request, devices: tp.Iterable[str]) -> tp.Tuple[tp.List[str], tp.List[str]]:
    """Errors (the submission can only fail: refuse it) and warnings (it would train somewhere else
    than meant) of ``req`` for runs on ``devices`` (each run's ``device`` key).

    - ``device=cuda[:N]`` in a job without a GPU (or N beyond its GPUs): error;
    - more tasks (processes of a data-parallel run) per node than GPUs, on a GPU: error;
    - ``device=auto`` in a job without a GPU: warning (it trains on the CPU);
    - ``device=cpu`` in a job with GPUs: warning (they are reserved and unused).
    """
    devices = sorted(set(devices))
    errors: tp.List[str] = []
    warnings: tp.List[str] = []
    cuda = [d for d in devices if d.startswith("cuda")]
    gpus = req.gpus_per_node
    if cuda and gpus == 0:
        errors.append(f"device={cuda[0]} but hydra.launcher.gpus_per_node is null: the jobs would get no GPU "
                      "and fail; set hydra.launcher.gpus_per_node=N (one per task)")
    for dev in cuda:
        index = dev.partition(":")[2]
        if gpus and index.isdigit() and int(index) >= gpus:
            errors.append(f"device={dev} but each node gets {gpus} GPU(s) (hydra.launcher.gpus_per_node); "
                          "use device=cuda or device=auto")
    if gpus and any(not d.startswith("cpu") for d in devices) and req.tasks_per_node > gpus:
        errors.append(f"hydra.launcher.tasks_per_node={req.tasks_per_node} but gpus_per_node={gpus}: each "
                      f"process of a data-parallel run needs its own GPU; set hydra.launcher.gpus_per_node="
                      f"{req.tasks_per_node} (or device=cpu)")
    if gpus == 0 and "auto" in devices:
        warnings.append("gpus_per_node is null: jobs get no GPU (device=auto trains on the CPU); set "
                        "hydra.launcher.gpus_per_node=N, or device=cpu if the CPU is meant")
    if gpus and devices and all(d.startswith("cpu") for d in devices):
        warnings.append(f"device=cpu but hydra.launcher.gpus_per_node={gpus}: the GPUs are reserved and unused")
    return errors, warnings


def gpu_hours(runs: int, req: Request) -> float:
    """The most GPU-hours ``runs`` jobs can use: runs x nodes x GPUs per node x the time limit
    (each job is charged at most its time limit; a run that finishes early uses less, a requeued
    one is charged again)."""
    return runs * req.nodes * req.gpus_per_node * req.hours


def describe(req: Request) -> tp.List[str]:
    """The job's resources, one ``key value`` line each (``—``: the cluster's default)."""
    def shown(value: tp.Any, unit: str = "") -> str:
        return "— (cluster default)" if value in (None, "") else f"{value}{unit}"
    lines = [f"partition        {shown(req.partition)}",
             f"nodes            {req.nodes}",
             f"tasks_per_node   {req.tasks_per_node}" + ("  (processes of one data-parallel run)"
                                                         if req.nodes * req.tasks_per_node > 1 else ""),
             f"gpus_per_node    {req.gpus_per_node if req.gpus_per_node else 'none'}",
             f"cpus_per_task    {shown(req.cpus_per_task)}",
             f"mem              {shown(req.mem_gb, ' GB')}",
             f"time             {req.timeout_min} min ({req.hours:g} h)"]
    lines += [f"{k:<16} {v}" for k, v in sorted(req.other.items())]
    lines += ["setup            " + ("(none)" if not req.setup else req.setup[0])]
    lines += [f"                 {line}" for line in req.setup[1:]]
    return lines


def dry_run_report(arrays: tp.Sequence[tp.Tuple[str, tp.Sequence[str]]], skipped: tp.Sequence[str],
                   req: Request, python: str, warnings: tp.Sequence[str]) -> str:
    """What ``hydra.launcher.dry_run=true`` prints instead of submitting.

    Args:
        arrays: (title, one line per run) of each job array, in submission order.
        skipped: one line per run the sweep skips (done, or queued/running).
        req: each job's resources.
        python: the interpreter the jobs run (submitit runs the submitting one).
        warnings: from :func:`check` (its errors refuse the launch, dry or not).
    """
    runs = sum(len(lines) for _, lines in arrays)
    out = [f"dry run (hydra.launcher.dry_run=true): nothing submitted; a real launch would submit "
           f"{runs} run(s) in {len(arrays)} SLURM job array(s)"]
    for title, lines in arrays:
        out.append(f"job array {title}: {len(lines)} job(s), at most "
                   f"{min(len(lines), req.array_parallelism)} at once")
        out += [f"  {line}" for line in lines]
    out.append("each job:")
    out += [f"  {line}" for line in describe(req)]
    out.append(f"  python           {python}  (the jobs run this interpreter: it must exist at this path "
               "on the nodes)")
    hours = gpu_hours(runs, req)
    out.append(f"GPU-hours: at most {hours:.1f} ({runs} run(s) x {req.nodes} node(s) x {req.gpus_per_node} "
               f"GPU(s) x {req.hours:g} h; the time-limit bound: a run that ends early uses less, a "
               "requeued one more)")
    out.append(f"skipped: {len(skipped)} run(s)" + (":" if skipped else " (none done or queued)"))
    out += [f"  {line}" for line in skipped]
    out += [f"warning: {w}" for w in warnings]
    return "\n".join(out)
