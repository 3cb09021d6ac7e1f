"""``diffq-bench-status [--grid NAME]``: one line per run, from the run store and the scheduler.

Columns: signature, state (status.json; ``NEW`` for a grid run never launched), the scheduler's
view of its latest job (squeue/sacct), job id, attempt, requeues, epoch, age of the last log line,
best metric so far (validation, or test once DONE), the run (task, quantizer and the grid's
overrides or the run's axes) and a note saying why a run is in its state.

States that the run store alone cannot tell:

- ``STALE``: status.json says RUNNING/QUEUED but nothing is working on the run: its scheduler job
  ended, or (RUNNING) its process is dead (same host: the recorded pid no longer exists), or its
  heartbeat (refreshed at least every minute while training, see ``diffq_bench.train``) is older
  than :data:`STALE_AFTER_S`. A STALE run is relaunched (and resumed) by the next launch.
- ``CORRUPT``: status.json exists but is not valid JSON; the note names the file.
- A PENDING job's scheduler reason is in the note (``pending: Resources``); a reason that can
  never resolve by itself (:func:`diffq_bench.launch.slurm.impossible_reason`) says what to change.
"""
from __future__ import annotations

import datetime
import os
import socket
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
COLUMNS = ("sig", "state", "slurm", "job", "attempt", "requeues", "epoch", "log age", "best", "run",
           "note")
#: a RUNNING run whose heartbeat is older than this (seconds) is STALE: ten heartbeats missed
#: (the loop refreshes it at least once a minute, so only a step or evaluation taking over ten
#: minutes on another host could be shown STALE while alive; on the run's host the pid decides).
STALE_AFTER_S = 600.0


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


def _age(stamp: tp.Any, now: float) -> tp.Optional[float]:
    try:
        parsed = datetime.datetime.fromisoformat(str(stamp))
    except ValueError:
        return None
    return now - parsed.timestamp() if parsed.tzinfo is not None else None


def liveness(status: tp.Mapping[str, tp.Any], now: tp.Optional[float] = None) -> tp.Optional[str]:
    """Why a RUNNING run is not alive (None when it may be): its process is dead (same host) or
    its heartbeat is older than :data:`STALE_AFTER_S`."""
    now = time.time() if now is None else now
    if status.get("host") == socket.gethostname() and status.get("pid"):
        try:
            os.kill(int(status["pid"]), 0)
        except ProcessLookupError:
            return f"process {status['pid']} on {status['host']} is dead"
        except (PermissionError, ValueError):
            pass
        else:
            return None
    age = _age(status.get("heartbeat") or status.get("updated"), now)
    if age is not None and age > STALE_AFTER_S:
        return f"no heartbeat for {format_age(age)} (host {status.get('host')}, pid {status.get('pid')})"
    return None


def _label(xp: Xp) -> str:
    """task and quantizer of a run (and its varying axes once finished), from its own files."""
    found = (_read(xp.read_result) or {}).get("axes") or {}
    if not found:
        try:
            config = xp.read_config() or {}
            found = {"task.name": config["task"]["name"], "quant.name": config["quant"]["name"]}
        except Exception:  # noqa: BLE001 - config.yaml not written yet or unreadable
            return ""
    return " ".join(f"{k}={found[k]}" for k in LABEL_AXES if k in found)


def _failure(status: tp.Mapping[str, tp.Any]) -> str:
    lines = [ln.strip() for ln in str(status.get("traceback") or "").splitlines() if ln.strip()]
    where = "before training" if not status.get("epoch") else f"in epoch {int(status['epoch']) + 1}"
    return f"failed {where}" + (f": {lines[-1][:160]}" if lines else "")


def run_row(folder: Path, job_state: tp.Mapping[str, str], label: str = "",
            now: tp.Optional[float] = None,
            reasons: tp.Optional[tp.Mapping[str, str]] = None) -> tp.Dict[str, str]:
    """The table row of one run folder (see module docstring for the columns).

    Args:
        folder: the run folder.
        job_state: job id -> scheduler state.
        label: the run's overrides (default: its task, quantizer and axes).
        now: the current time (seconds since the epoch).
        reasons: job id -> squeue's reason of a PENDING job.
    """
    xp = Xp.at(folder)
    note = ""
    try:
        status = xp.read_status() or {}
        corrupt = False
    except LoadError:
        status, corrupt = {}, True
    subs = xp.read_submissions()
    job = str(subs[-1]["job_id"]) if subs else (status.get("job_id") or "")
    sched = job_state.get(job, "") if job else ""
    state = status.get("state") or ("QUEUED" if subs else "NEW")
    # status.json written before the latest submission describes an older job
    outdated = bool(subs) and str(status.get("updated", "")) < str(subs[-1].get("submitted", ""))
    if corrupt:
        state, note = "CORRUPT", f"{xp.status_path} is not valid JSON (delete it: the run resumes)"
    elif state in ("RUNNING", "QUEUED") and sched and not slurm.is_live(sched):
        state, note = "STALE", f"its job {job} is {sched}"
    elif (outdated or not status) and slurm.is_live(sched):
        state = "QUEUED" if sched == "PENDING" else "RUNNING"
    elif state == "RUNNING" and not slurm.is_live(sched):
        dead = liveness(status, now)
        if dead:
            state, note = "STALE", dead
    if state == "FAILED":
        note = _failure(status)
    elif state in ("CANCELLED", "INTERRUPTED") and status.get("reason"):
        note = str(status["reason"])
    if sched == "PENDING" and (reasons or {}).get(job):
        reason = reasons[job]
        fix = slurm.impossible_reason(reason)
        note = f"pending: {reason}" + (f" - can never start: {fix}" if fix else "")
    epochs, subset = None, 0
    try:
        config = xp.read_config() or {}
        epochs = config["train"]["epochs"]
        subset = int(config["task"].get("eval_subset") or 0)
    except Exception:  # noqa: BLE001 - config.yaml not written yet or unreadable
        pass
    if subset > 0:  # e.g. +preset=debug: its metric is not a real result
        partial = f"tested on the first {subset} items only (task.eval_subset={subset})"
        note = f"{note}; {partial}" if note else partial
    epoch = str(status.get("epoch", 0)) + (f"/{epochs}" if epochs else "") if status else "-"
    if not label or label.startswith("("):
        label = f"{_label(xp)} {label}".strip()
    else:  # a grid's overrides: name the task and quantizer when they do not
        own = [part for part in _label(xp).split() if part.startswith(("task.name=", "quant.name="))
               and f"{part.split('.')[0]}=" not in label]
        label = " ".join(own + [label])
    return {"sig": folder.name, "state": state, "slurm": sched or "-", "job": job or "-",
            "attempt": str(status.get("attempt", "-")), "requeues": str(status.get("requeues", "-")),
            "epoch": epoch, "log age": format_age(xp.log_age(now)),
            "best": best_metric(folder), "run": label or "-", "note": note or "-"}


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
    reasons: tp.Dict[str, str] = {}
    if ids and slurm.available():
        try:
            info = slurm.job_info(ids)
        except slurm.SlurmError as exc:
            print(f"warning: no scheduler information ({exc})", file=sys.stderr)
        else:
            job_state = {jid: state for jid, (state, _) in info.items()}
            reasons = {jid: reason for jid, (_, reason) in info.items() if reason}
    now = time.time()
    return [run_row(folder, job_state, label, now, reasons) for folder, label in runs]


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
