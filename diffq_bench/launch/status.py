"""``diffq-bench-status [--grid NAME]``: one line per run, from the run store and the scheduler.

Columns: signature, state (status.json; ``NEW`` for a grid run never launched), the scheduler's
view of its latest job (squeue/sacct), job id, attempt, requeues, epoch, age of the last log line,
best metric so far (validation, or test once DONE) and the run's overrides or axes.
A state that contradicts the scheduler is flagged: a run RUNNING/QUEUED in status.json whose job
ended without finishing it is shown as ``STALE`` (it will be relaunched by the next sweep).
"""
from __future__ import annotations

import sys
import time
import typing as tp
from pathlib import Path

from omegaconf import OmegaConf

from ..config import compose, find_conf_dir
from ..io import LoadError
from ..tasks import TASKS, Task
from ..xp import Xp
from . import plan, slurm

#: axes shown in the ``run`` column when the grid's overrides are not known
LABEL_AXES = ("task.name", "quant.name", "lambda", "group_size", "quant.bits", "seed")
COLUMNS = ("sig", "state", "slurm", "job", "attempt", "requeues", "epoch", "log age", "best", "run")


def _read(read: tp.Callable[[], tp.Optional[tp.Dict[str, tp.Any]]]) -> tp.Optional[tp.Dict[str, tp.Any]]:
    try:
        return read()
    except LoadError:
        return None


def format_age(seconds: tp.Optional[float]) -> str:
    """``42s``, ``7m``, ``3h``, ``2d`` (``-`` when unknown)."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def task_of(xp: Xp) -> tp.Optional[tp.Type[Task]]:
    """The run's task class, from its config.yaml and the registry (None when unknown)."""
    try:
        return TASKS[(xp.read_config() or {})["task"]["name"]]
    except Exception:  # noqa: BLE001 - unknown task / unreadable config: no metric column
        return None


def best_metric(folder: Path) -> str:
    """``test_ppl=18.1`` once DONE, else the best validation value so far (``valid_ppl=20.3@e4``)."""
    xp = Xp.at(folder)
    result = _read(xp.read_result)
    if result:
        key = f"test_{result.get('metric')}"
        value = (result.get("metrics") or {}).get(key)
        if value is not None:
            return f"{key}={value:.4g}"
    try:
        history = xp.read_history()
    except ValueError:
        return "-"
    task = task_of(xp)
    if task is None:
        return "-"
    best: tp.Optional[tp.Tuple[float, int]] = None
    for entry in history:
        value = (entry.get("valid") or {}).get(task.metric)
        if value is not None and task.is_better(value, None if best is None else best[0]):
            best = (float(value), int(entry.get("epoch", 0)))
    return "-" if best is None else f"valid_{task.metric}={best[0]:.4g}@e{best[1]}"


def run_row(folder: Path, job_state: tp.Mapping[str, str], label: str = "",
            now: tp.Optional[float] = None) -> tp.Dict[str, str]:
    """The table row of one run folder (see module docstring for the columns)."""
    xp = Xp.at(folder)
    status = _read(xp.read_status) or {}
    subs = xp.read_submissions()
    job = str(subs[-1]["job_id"]) if subs else (status.get("job_id") or "")
    sched = job_state.get(job, "") if job else ""
    state = status.get("state") or ("QUEUED" if subs else "NEW")
    # status.json written before the latest submission describes an older job
    outdated = bool(subs) and str(status.get("updated", "")) < str(subs[-1].get("submitted", ""))
    if state in ("RUNNING", "QUEUED") and sched and not slurm.is_live(sched):
        state = "STALE"
    elif (outdated or not status) and slurm.is_live(sched):
        state = "QUEUED" if sched == "PENDING" else "RUNNING"
    epochs = None
    try:
        epochs = (xp.read_config() or {})["train"]["epochs"]
    except Exception:  # noqa: BLE001 - config.yaml not written yet or unreadable
        pass
    epoch = str(status.get("epoch", 0)) + (f"/{epochs}" if epochs else "") if status else "-"
    if not label:
        found = (_read(xp.read_result) or {}).get("axes") or {}
        label = " ".join(f"{k}={found[k]}" for k in LABEL_AXES if k in found)
    return {"sig": folder.name, "state": state, "slurm": sched or "-", "job": job or "-",
            "attempt": str(status.get("attempt", "-")), "requeues": str(status.get("requeues", "-")),
            "epoch": epoch, "log age": format_age(xp.log_age(now)),
            "best": best_metric(folder), "run": label or "-"}


def grid_runs(grid: str, root: tp.Optional[str] = None,
              overrides: tp.Sequence[str] = ()) -> tp.List[tp.Tuple[Path, str]]:
    """(run folder, overrides) of every run of grid ``grid``, composed like the sweeper does.

    Args:
        grid: name of ``conf/grid/<grid>.yaml``.
        root: ``paths.root`` override (default: the config's).
        overrides: the extra command-line overrides the grid was launched with.
    """
    grids = find_conf_dir() / "grid"
    if not (grids / f"{grid}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in grids.glob("*.yaml"))) or "none"
        raise ValueError(f"unknown grid {grid!r}: no conf/grid/{grid}.yaml (available: {known})")
    extra = [*([f"paths.root={root}"] if root else []), *overrides]
    base = compose([f"+grid={grid}", *[o for o in extra if "," not in o]])
    runs = OmegaConf.to_container(base.grid.runs, resolve=False)
    out = []
    for job in plan.expand_grid(runs, [f"+grid={grid}", *extra], grid):
        cfg = plan.without_hydra(compose(job))
        out.append((Xp(cfg.paths.root, cfg).folder,
                    " ".join(o for o in job if o not in extra and not o.startswith("+grid="))))
    return list(dict.fromkeys(out))


def collect(root: Path, grid: tp.Optional[str] = None,
            overrides: tp.Sequence[str] = ()) -> tp.List[tp.Dict[str, str]]:
    """Rows for all runs under ``root/xps``, or for the runs of ``grid`` (never launched ones as
    NEW) followed by any other run folder whose status lists that grid.

    Args:
        root: the run store root.
        grid: grid name (None: every run folder).
        overrides: command-line overrides the grid was launched with (change the signatures).
    """
    if grid:
        runs = grid_runs(grid, str(root), overrides)
        listed = {folder for folder, _ in runs}
        for xp in Xp.all(root):
            status = _read(xp.read_status) or {}
            if xp.folder not in listed and grid in (status.get("grids") or []):
                runs.append((xp.folder, "(grid run launched with other overrides)"))
    else:
        runs = [(xp.folder, "") for xp in Xp.all(root)]
    ids = set()
    for folder, _ in runs:
        xp = Xp.at(folder)
        ids.update(xp.known_job_ids(_read(xp.read_status)))
    job_state: tp.Dict[str, str] = {}
    if ids and slurm.available():
        try:
            job_state = slurm.job_states(ids)
        except slurm.SlurmError as exc:
            print(f"warning: no scheduler information ({exc})", file=sys.stderr)
    now = time.time()
    return [run_row(folder, job_state, label, now) for folder, label in runs]


def render(rows: tp.Sequence[tp.Mapping[str, str]]) -> str:
    """A fixed-width text table plus a count per state."""
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip(),
             "  ".join("-" * widths[c] for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
    counts: tp.Dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)
