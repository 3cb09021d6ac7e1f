"""``diffq-bench-status [--grid NAME]``: one line per run, from the run store and the scheduler.

Columns: signature, state (status.json; ``NEW`` for a grid run never launched), the scheduler's
view of its latest job (squeue/sacct), job id, attempt, requeues, epoch, age of the last log line,
best metric so far (validation, or test once DONE) and the run's overrides or axes.
A state that contradicts the scheduler is flagged: a run RUNNING/QUEUED in status.json whose job
ended without finishing it is shown as ``STALE`` (it will be relaunched by the next sweep).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import typing as tp
from pathlib import Path

from . import slurm, sweep

#: axes shown in the ``run`` column when the grid's overrides are not known
LABEL_AXES = ("task.name", "quant.name", "lambda", "group_size", "quant.bits", "seed")
COLUMNS = ("sig", "state", "slurm", "job", "attempt", "requeues", "epoch", "log age", "best", "run")


def _read_json(path: Path) -> tp.Optional[tp.Dict[str, tp.Any]]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
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


def last_log_age(folder: Path, now: tp.Optional[float] = None) -> tp.Optional[float]:
    """Seconds since the last line of ``log.txt`` (its ISO timestamp, else the file's mtime)."""
    path = folder / "log.txt"
    if not path.exists():
        return None
    now = time.time() if now is None else now
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if lines:
        try:
            stamp = datetime.datetime.fromisoformat(lines[-1].split(" ", 1)[0])
            if stamp.tzinfo is not None:
                return now - stamp.timestamp()
        except ValueError:
            pass
    return now - path.stat().st_mtime


def _metric_of(folder: Path) -> tp.Tuple[tp.Optional[str], bool]:
    """(metric name, lower_is_better) of the run's task, from its config.yaml and the registry."""
    from omegaconf import OmegaConf
    try:
        name = OmegaConf.load(folder / "config.yaml").task.name
        from .tasks import TASKS
        cls = TASKS[name]
        return cls.metric, cls.lower_is_better
    except Exception:  # noqa: BLE001 - unknown task / unreadable config: no metric column
        return None, True


def best_metric(folder: Path) -> str:
    """``test_ppl=18.1`` once DONE, else the best validation value so far (``valid_ppl=20.3@e4``)."""
    result = _read_json(folder / "result.json")
    if result:
        key = f"test_{result.get('metric')}"
        value = (result.get("metrics") or {}).get(key)
        if value is not None:
            return f"{key}={value:.4g}"
    history = folder / "history.jsonl"
    if not history.exists():
        return "-"
    metric, lower = _metric_of(folder)
    best: tp.Optional[tp.Tuple[float, int]] = None
    for line in history.read_text().splitlines():
        entry = json.loads(line) if line.strip() else {}
        value = (entry.get("valid") or {}).get(metric) if metric else None
        if value is None:
            continue
        if best is None or (value < best[0] if lower else value > best[0]):
            best = (float(value), int(entry.get("epoch", 0)))
    return "-" if best is None else f"valid_{metric}={best[0]:.4g}@e{best[1]}"


def run_row(folder: Path, job_state: tp.Mapping[str, str], label: str = "",
            now: tp.Optional[float] = None) -> tp.Dict[str, str]:
    """The table row of one run folder (see module docstring for the columns)."""
    status = _read_json(folder / "status.json") or {}
    subs = sweep.read_submissions(folder)
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
        from omegaconf import OmegaConf
        epochs = OmegaConf.load(folder / "config.yaml").train.epochs
    except Exception:  # noqa: BLE001 - config.yaml not written yet
        pass
    epoch = str(status.get("epoch", 0)) + (f"/{epochs}" if epochs else "") if status else "-"
    if not label:
        found = (_read_json(folder / "result.json") or {}).get("axes") or {}
        label = " ".join(f"{k}={found[k]}" for k in LABEL_AXES if k in found)
    return {"sig": folder.name, "state": state, "slurm": sched or "-", "job": job or "-",
            "attempt": str(status.get("attempt", "-")), "requeues": str(status.get("requeues", "-")),
            "epoch": epoch, "log age": format_age(last_log_age(folder, now)),
            "best": best_metric(folder), "run": label or "-"}


def grid_runs(grid: str, root: tp.Optional[str] = None,
              overrides: tp.Sequence[str] = ()) -> tp.List[tp.Tuple[Path, str]]:
    """(run folder, overrides) of every run of grid ``grid``, composed like the sweeper does.

    Args:
        grid: name of ``conf/grid/<grid>.yaml``.
        root: ``paths.root`` override (default: the config's).
        overrides: the extra command-line overrides the grid was launched with.
    """
    from omegaconf import OmegaConf
    from .config import compose, find_conf_dir
    from .xp import Xp
    grids = find_conf_dir() / "grid"
    if not (grids / f"{grid}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in grids.glob("*.yaml"))) or "none"
        raise ValueError(f"unknown grid {grid!r}: no conf/grid/{grid}.yaml (available: {known})")
    extra = [*([f"paths.root={root}"] if root else []), *overrides]
    base = compose([f"+grid={grid}", *[o for o in extra if "," not in o]])
    runs = OmegaConf.to_container(base.grid.runs, resolve=False)
    out = []
    for job in sweep.expand_grid(runs, [f"+grid={grid}", *extra], grid):
        cfg = sweep.without_hydra(compose(job))
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
        for folder in sorted((root / "xps").glob("*")):
            status = _read_json(folder / "status.json") or {}
            if folder not in listed and grid in (status.get("grids") or []):
                runs.append((folder, "(grid run launched with other overrides)"))
    else:
        runs = [(p, "") for p in sorted((root / "xps").glob("*")) if p.is_dir()]
    ids = set()
    for folder, _ in runs:
        subs = sweep.read_submissions(folder)
        status = _read_json(folder / "status.json") or {}
        ids.update(sweep.known_job_ids(folder, status) if (subs or status) else [])
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


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """``diffq-bench-status [--grid NAME] [--root DIR] [--json] [OVERRIDES...]``."""
    parser = argparse.ArgumentParser(prog="diffq-bench-status", description=__doc__.split("\n")[0])
    parser.add_argument("--grid", help="only the runs of conf/grid/<NAME>.yaml (never launched: NEW)")
    parser.add_argument("--root", default="outputs", help="run store root (paths.root), default: outputs")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("overrides", nargs="*",
                        help="with --grid: the overrides the grid was launched with (task=...)")
    args = parser.parse_args(argv)
    if args.overrides and not args.grid:
        parser.error("overrides are only meaningful with --grid")
    root = Path(args.root)
    if not args.grid and not (root / "xps").is_dir():
        parser.error(f"no run store at {root / 'xps'} (pass --root, the paths.root of your runs)")
    try:
        rows = collect(root, args.grid, args.overrides)
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(rows, indent=2) if args.json else render(rows))
