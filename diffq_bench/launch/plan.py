"""Sweeps: expand a grid into runs, decide which to launch, and remember what was submitted.

A grid (``conf/grid/<name>.yaml``, format in docs/INTERFACES.md) lists runs as dicts of overrides
whose comma-separated values are swept (product within the entry). Command-line overrides apply to
every run (and win over the grid's value for the same key); command-line sweeps multiply the grid.

Before launching, every run's config is composed and its signature computed
(:class:`diffq_bench.xp.Xp`); the plan then keeps only the runs that need work:

- ``done``: the run folder says DONE with a result -> skipped (``runtime.force=true`` reruns it);
- ``live``: a job recorded for the run (``submissions.jsonl`` or ``status.json``) is still queued
  or running according to squeue/sacct, or a local run's process is alive -> skipped;
- ``launch``: everything else (new, FAILED, interrupted, cancelled) -> launched, and resumed from
  its checkpoint by the training loop if it has one.

The launcher records each submission (job id, time, sweep folder) in the run folder
(:meth:`diffq_bench.xp.Xp.record_submission`) so a second launch of the same grid sees the queued
jobs before they start.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import re
import socket
import typing as tp
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import init
from ..config import to_container
from ..xp import Xp, parent_config, signature
from . import slurm

logger = logging.getLogger(__name__)
ACTIONS = ("launch", "done", "live", "blocked")


class GridError(ValueError):
    """A grid file is malformed (the message names the entry and what was expected)."""


def _parser() -> tp.Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    return OverridesParser.create()


def _format_value(key: str, value: tp.Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str) and (" " in value or "=" in value):
        # one value holding spaces or '=' (init='run:task=x quant=none'): quoted, never swept
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise GridError(f"{where}: value of {key!r} must be a scalar or a comma-separated string "
                    f"of values to sweep, got {type(value).__name__} {value!r}")


def entry_overrides(entry: tp.Any, where: str = "grid entry") -> tp.List[str]:
    """One grid entry (``{key: value}``) as Hydra override strings (``key=value``).

    Args:
        entry: mapping of override keys (``task``, ``quant.bits``, ``+extra``) to scalars; string
            values with commas are sweeps (``"1,5,10"``).
        where: label used in error messages.
    """
    if not isinstance(entry, tp.Mapping) or not entry:
        raise GridError(f"{where}: expected a non-empty mapping of override -> value, got {entry!r}")
    return [f"{key}={_format_value(str(key), value, where)}" for key, value in entry.items()]


def expand_overrides(overrides: tp.Sequence[str]) -> tp.List[tp.List[str]]:
    """Cartesian product of Hydra override strings (``a=1,2 b=x`` -> 2 lists).

    A later override of the same key replaces an earlier one, so command-line values placed after
    a grid entry's win. Only discrete sweeps (comma lists, ``range``, ``choice``) can be expanded.

    Args:
        overrides: override strings in order of precedence (lowest first).
    """
    parsed = _parser().parse_overrides(list(overrides))
    Slot = tp.Tuple[str, tp.Optional[str]]  # (key or group, package)
    by_key: "collections.OrderedDict[Slot, tp.List[str]]" = collections.OrderedDict()
    for ovr in parsed:
        slot = (ovr.key_or_group, ovr.package)
        by_key.pop(slot, None)  # re-insert: the latest position and value win
        key = ovr.get_key_element()
        if ovr.is_sweep_override():
            if not ovr.is_discrete_sweep():
                raise GridError(f"cannot expand {ovr.input_line!r}: only comma lists, range() and "
                                "choice() sweeps can be used in a grid")
            by_key[slot] = [f"{key}={val}" for val in ovr.sweep_string_iterator()]
        else:
            by_key[slot] = [f"{key}={ovr.get_value_element_as_str()}"]
    return [list(combo) for combo in itertools.product(*by_key.values())]


def expand_grid(runs: tp.Optional[tp.Sequence[tp.Any]], arguments: tp.Sequence[str],
                grid_name: str = "grid") -> tp.List[tp.List[str]]:
    """All runs of a sweep as override lists: each grid entry x the command-line overrides.

    Without a grid (``runs`` empty/None) this is the plain command-line product, as Hydra's basic
    sweeper does. Duplicated override lists are kept once.

    Args:
        runs: ``grid.runs`` entries (None when no grid is selected).
        arguments: the command-line overrides (including ``+grid=<name>`` itself).
        grid_name: for error messages.
    """
    if runs is not None and not isinstance(runs, (list, tuple)):
        raise GridError(f"grid {grid_name!r}: 'runs' must be a list of override mappings, got {runs!r}")
    entries = [entry_overrides(e, f"grid {grid_name!r} run #{i}") for i, e in enumerate(runs or [])]
    out: tp.List[tp.List[str]] = []
    seen: tp.Set[tp.Tuple[str, ...]] = set()
    for entry in entries or [[]]:
        for combo in expand_overrides(list(entry) + list(arguments)):
            key = tuple(sorted(combo))
            if key not in seen:
                seen.add(key)
                out.append(combo)
    return out


@dataclasses.dataclass
class PlannedRun:
    """One run of a sweep and what the plan does with it."""
    overrides: tp.List[str]
    sig: str
    folder: Path
    action: str = "launch"          # one of ACTIONS
    reason: str = ""
    job_id: tp.Optional[str] = None
    parent: tp.Optional[str] = None  # signature of its init run (init=run:...), if any
    device: str = "auto"             # its ``device`` (what a launcher must give it: a GPU or not)


@dataclasses.dataclass(frozen=True)
class Dependency:
    """What a launched run waits for: its init run launched in the same call (its overrides), or
    that run's job still queued or running from an earlier sweep (its job id)."""
    overrides: tp.Optional[tp.Tuple[str, ...]] = None
    job_id: tp.Optional[str] = None
    sig: str = ""


def _local_process_alive(status: tp.Mapping[str, tp.Any]) -> bool:
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def without_hydra(cfg: tp.Any) -> tp.Any:
    """``cfg`` minus its ``hydra`` node, which cannot be resolved before the launcher numbers the
    job (``hydra.sweep.subdir: ${hydra.job.num}``) and is not part of the run identity anyway."""
    if isinstance(cfg, DictConfig) and "hydra" in cfg:
        return OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    return cfg


def plan(runs: tp.Sequence[tp.Tuple[tp.List[str], tp.Any]], force: bool = False,
         states: tp.Optional[tp.Callable[[tp.Iterable[str]], tp.Dict[str, str]]] = None,
         ) -> tp.List[PlannedRun]:
    """Decide, for each composed run, whether to launch it or skip it (see module docstring).

    Args:
        runs: (overrides, composed config) pairs; the config must have ``paths.root``.
        force: launch DONE runs again (``runtime.force``); live jobs are still never duplicated.
        states: job id -> scheduler state lookup (default :func:`diffq_bench.slurm.job_states`;
            skipped with a warning when SLURM is not installed and no job id is recorded).
    """
    planned: tp.List[PlannedRun] = []
    by_sig: tp.Dict[str, PlannedRun] = {}
    statuses: tp.Dict[str, tp.Dict[str, tp.Any]] = {}
    for overrides, cfg in runs:
        xp = Xp(cfg.paths.root, without_hydra(cfg))
        if xp.sig in by_sig:
            logger.info("same run as %s (signature %s): %s", " ".join(by_sig[xp.sig].overrides),
                        xp.sig, " ".join(overrides))
            continue
        item = PlannedRun(list(overrides), xp.sig, xp.folder, parent=_parent_sig(cfg),
                          device=str(OmegaConf.select(cfg, "device", default="auto")))
        by_sig[xp.sig] = item
        planned.append(item)
        status = xp.read_status() or {}
        statuses[xp.sig] = status
        if xp.is_done() and not force:
            item.action, item.reason = "done", "result exists"
    # one scheduler query for the whole sweep
    pending = [p for p in planned if p.action == "launch"]
    ids = {p.sig: Xp.at(p.folder).known_job_ids(statuses[p.sig]) for p in pending}
    all_ids = sorted({j for v in ids.values() for j in v})
    lookup = states or slurm.job_states
    job_state: tp.Dict[str, str] = {}
    if all_ids:
        if states is None and not slurm.available():
            logger.warning("runs record SLURM jobs but the SLURM tools are missing: assuming those jobs ended")
        else:
            job_state = lookup(all_ids)
    for item in pending:
        for jid in ids[item.sig]:
            if slurm.is_live(job_state.get(jid)):
                item.action, item.job_id = "live", jid
                item.reason = f"job {jid} is {job_state[jid]}"
                break
        else:
            status = statuses[item.sig]
            if status.get("state") == "RUNNING" and not status.get("job_id") and _local_process_alive(status):
                item.action, item.reason = "live", f"running locally (pid {status['pid']})"
    for item in planned:  # an init run must be DONE, or launched (or queued) before its children
        if item.action != "launch" or item.parent is None:
            continue
        parent = by_sig.get(item.parent)
        if parent is not None and parent.action in ("launch", "live"):
            continue
        if parent is None and not Xp(item.folder.parent.parent, sig=item.parent).is_done():
            item.action = "blocked"
            item.reason = (f"its init run {item.parent} is not DONE and not part of this sweep: add "
                           "that run to the sweep (or grid), or run it first")
    return planned


def _parent_sig(cfg: tp.Any) -> tp.Optional[str]:
    spec = init.parse(OmegaConf.select(cfg, "init", default=None))
    if spec is None or not spec.is_run:
        return None
    return signature(parent_config(to_container(without_hydra(cfg)), spec))


#: run folder and dependency of each planned override list, filled by the sweeper so the
#: launcher records submissions and orders runs without composing every config a second time.
_FOLDERS: tp.Dict[tp.Tuple[str, ...], Path] = {}
_DEPENDS: tp.Dict[tp.Tuple[str, ...], Dependency] = {}
#: the last sweep's plan (every run, skipped ones included), for a launcher's dry run
_PLANNED: tp.List[PlannedRun] = []


def remember(planned: tp.Sequence[PlannedRun]) -> None:
    """Cache each planned run's folder (:func:`run_folder`) and what it waits for
    (:func:`dependency`); called by the sweeper before it calls the launcher."""
    by_sig = {item.sig: item for item in planned}
    _PLANNED[:] = list(planned)
    for item in planned:
        key = tuple(item.overrides)
        _FOLDERS[key] = item.folder
        parent = by_sig.get(item.parent) if item.parent else None
        if parent is not None and parent.action == "launch":
            _DEPENDS[key] = Dependency(overrides=tuple(parent.overrides), sig=parent.sig)
        elif parent is not None and parent.action == "live":
            _DEPENDS[key] = Dependency(job_id=parent.job_id, sig=parent.sig)
        else:
            _DEPENDS.pop(key, None)


def last_plan() -> tp.List[PlannedRun]:
    """Every run of the last sweep's plan (:func:`remember`), skipped ones included."""
    return list(_PLANNED)


def dependency(overrides: tp.Sequence[str]) -> tp.Optional[Dependency]:
    """What the run of ``overrides`` must wait for before it starts (None: nothing)."""
    return _DEPENDS.get(tuple(overrides))


def in_dependency_order(jobs: tp.Sequence[tp.Sequence[str]]) -> tp.List[tp.List[tp.List[str]]]:
    """``jobs`` in waves: each wave's runs wait only for runs of earlier waves (or outside jobs).

    Raises:
        GridError: runs waiting for each other in a cycle.
    """
    todo = [list(job) for job in jobs]
    keys = {tuple(job) for job in todo}
    done: tp.Set[tp.Tuple[str, ...]] = set()
    waves = []
    while todo:
        wave = [job for job in todo if (dep := dependency(job)) is None or dep.overrides is None
                or dep.overrides not in keys or dep.overrides in done]
        if not wave:
            raise GridError("these runs wait for each other's init runs in a cycle: "
                            + "; ".join(" ".join(job) for job in todo))
        waves.append(wave)
        done |= {tuple(job) for job in wave}
        todo = [job for job in todo if tuple(job) not in done]
    return waves


def run_folder(overrides: tp.Sequence[str], compose: tp.Callable[[tp.List[str]], tp.Any]) -> Path:
    """The run folder of a job, from the sweeper's cache or by composing its config.

    Args:
        overrides: the job's override list.
        compose: overrides -> composed config (the launcher's Hydra config loader).
    """
    key = tuple(overrides)
    if key not in _FOLDERS:
        cfg = without_hydra(compose(list(overrides)))
        _FOLDERS[key] = Xp(cfg.paths.root, cfg).folder
    return _FOLDERS[key]


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")


def failure_line(error: tp.Any) -> str:
    """The exception line of a failed job (submitit wraps the job's traceback in its message)."""
    text = str(error)
    found = [m.group(0) for m in map(_EXC_LINE.match, text.splitlines()) if m]
    if found:
        return found[-1]
    first = text.strip().splitlines()[0] if text.strip() else "failed"
    return f"{type(error).__name__}: {first}"


def summary(planned: tp.Sequence[PlannedRun]) -> str:
    """One line per skipped run plus a count per action, for the sweep's log."""
    lines = [f"  skip {p.sig} ({p.action}: {p.reason}): {' '.join(p.overrides)}"
             for p in planned if p.action != "launch"]
    counts = collections.Counter(p.action for p in planned)
    lines.append(f"{len(planned)} runs: {counts['launch']} to launch, {counts['done']} done, "
                 f"{counts['live']} queued/running"
                 + (f", {counts['blocked']} blocked" if counts["blocked"] else ""))
    return "\n".join(lines)
