"""Reading the run store and the published numbers for the tables.

Runs are read through :class:`diffq_bench.xp.Xp` (the only code that knows a run folder's files);
published numbers from ``results/reference/*.yaml`` (:func:`load_references`).
"""
from __future__ import annotations

import dataclasses
import sys
import typing as tp
from pathlib import Path

from ..io import LoadError
from ..xp import Xp
from .table import Reference

DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parents[2] / "results" / "reference"


def load_results(root: tp.Union[str, Path], task: tp.Optional[str] = None,
                 quant: tp.Optional[str] = None, grid: tp.Optional[str] = None
                 ) -> tp.List[tp.Dict[str, tp.Any]]:
    """Read every readable ``result.json`` under ``root/xps``, filtered.

    A run belongs to grid ``G`` when its ``result.json`` or its ``status.json`` lists ``G`` (a run
    finished by one grid and met again by another is tagged in status.json by the later attempt).

    Args:
        root: run store root (``paths.root``).
        task, quant, grid: keep only runs of this task / quantizer / grid (None: all).
    """
    out = []
    for xp in Xp.all(root):
        try:
            res = xp.read_result()
        except (OSError, LoadError) as exc:
            print(f"warning: skipping unreadable {xp.result_path}: {exc}", file=sys.stderr)
            continue
        if res is None or task and res.get("task") != task or quant and res.get("quant") != quant:
            continue
        if grid:
            grids = set(res.get("grids") or [])
            try:
                grids |= set((xp.read_status() or {}).get("grids") or [])
            except (OSError, LoadError, AttributeError):
                pass
            if grid not in grids:
                continue
        out.append(res)
    return out


def load_runs(folders: tp.Iterable[tp.Union[str, Path]]) -> tp.List[tp.Dict[str, tp.Any]]:
    """The ``result.json`` of each run folder that has a readable one, in order (a sweep's runs).

    Args:
        folders: run folders (``<root>/xps/<sig>``).
    """
    out = []
    for folder in folders:
        xp = Xp.at(folder)
        try:
            res = xp.read_result()
        except (OSError, LoadError) as exc:
            print(f"warning: skipping unreadable {xp.result_path}: {exc}", file=sys.stderr)
            continue
        if res is not None:
            out.append(res)
    return out


def load_references(folder: tp.Optional[tp.Union[str, Path]]) -> tp.List[Reference]:
    """Published numbers from ``folder/*.yaml`` (``references: [...]``), in file then entry order.

    Raises:
        ValueError: an entry lacks a required field (task, quant, metric, source, provenance) or
            has an unknown one; the message names the file and entry.
    """
    if folder is None or not Path(folder).is_dir():
        return []
    from omegaconf import OmegaConf
    fields = {f.name for f in dataclasses.fields(Reference)}
    out = []
    for path in sorted(Path(folder).glob("*.yaml")):
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        for i, entry in enumerate((data or {}).get("references") or []):
            where = f"{path.name} entry #{i}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected a mapping, got {entry!r}")
            unknown = sorted(set(entry) - fields)
            missing = sorted({"task", "quant", "metric", "source", "provenance"} - set(entry))
            if unknown or missing:
                raise ValueError(f"{where}: unknown field(s) {unknown}, missing field(s) {missing}; "
                                 f"valid fields: {sorted(fields)}")
            out.append(Reference(**entry))
    return out
