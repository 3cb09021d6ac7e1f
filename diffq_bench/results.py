"""Paper tables from the run store (``<root>/xps/*/result.json``), next to the published numbers.

``diffq-bench-table --grid table_lm --format md|latex|csv [--plot out.png]``. Runs are grouped
into one section per benchmark (task, and model when the task has several), runs differing only by
seed into one row (mean ± std), rows ordered by method then by the method's knobs (bits, λ, group
size). Published numbers come from ``results/reference/*.yaml`` (:func:`load_references`); a row
without one shows "—", a published number without our run shows our columns as "—". Output is a
pure function of the inputs: same run store and references, same bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing as tp
from pathlib import Path

# The table vocabulary and the renderers live in their own modules; this module stays the public
# entry point, so every name below is importable from diffq_bench.results as before.
from .results_model import METHODS, Reference, Row, Section, _order, _published, method_label
from .results_render import (FORMATS, MISSING, latex_escape, render,  # noqa: F401
                             render_sections, section_table, trade_off_notes)

#: metrics shown first in the per-run table, in this order (others follow alphabetically)
METRIC_ORDER = ("true_size_mb", "compression", "bits_per_weight", "wall_time_s")
#: axes averaged over (a row is a group of runs that differ only by these)
SEED_AXES = ("seed", "quant.seed")
#: aliases of method axes (the same value under two names), never shown as extra columns
_DUPLICATES = ("quant.penalty", "quant.group_size", "quant.name", "task.name", "task.model")
DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parent.parent / "results" / "reference"


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
    for path in sorted(Path(root).glob("xps/*/result.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"warning: skipping unreadable {path}: {exc}", file=sys.stderr)
            continue
        if task and res.get("task") != task or quant and res.get("quant") != quant:
            continue
        if grid:
            grids = set(res.get("grids") or [])
            try:
                grids |= set(json.loads((path.parent / "status.json").read_text()).get("grids") or [])
            except (OSError, json.JSONDecodeError, AttributeError):
                pass
            if grid not in grids:
                continue
        out.append(res)
    return out


# ---------------------------------------------------------------------------------------------
# Flat table: one row per run (``--per-run``)

def build_table(results: tp.Sequence[tp.Dict[str, tp.Any]]
                ) -> tp.Tuple[tp.List[str], tp.List[tp.List[tp.Any]]]:
    """Header and rows: sig, task, quant, the varying axes, the test metric, then the other metrics."""
    all_axes = sorted({k for r in results for k in r.get("axes", {})})
    varying = [k for k in all_axes if k not in ("task.name", "quant.name") and
               len({json.dumps(r.get("axes", {}).get(k)) for r in results}) > 1]
    metric_keys = {k for r in results for k in r.get("metrics", {})}
    tests = sorted({f"test_{r['metric']}" for r in results if "metric" in r})
    first = [m for m in tests + list(METRIC_ORDER) if m in metric_keys]
    rest = sorted(metric_keys - set(first))
    header = ["sig", "task", "quant"] + varying + first + rest
    rows = []
    for r in sorted(results, key=lambda r: (r.get("task", ""), r.get("quant", ""),
                                            [_order(r.get("axes", {}).get(k)) for k in varying],
                                            r.get("sig", ""))):
        row = [r.get("sig"), r.get("task"), r.get("quant")]
        row += [r.get("axes", {}).get(k) for k in varying]
        row += [r.get("metrics", {}).get(k) for k in first + rest]
        rows.append(row)
    return header, rows


# ---------------------------------------------------------------------------------------------
# Paper tables: sections of grouped rows with references

def _same(a: tp.Any, b: tp.Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


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


def _group(results: tp.Sequence[tp.Dict[str, tp.Any]]) -> tp.List[Row]:
    groups: tp.Dict[str, Row] = {}
    for res in results:
        axes = {k: v for k, v in res.get("axes", {}).items() if k not in SEED_AXES}
        # 10 and 10.0 are the same configuration (as in the run signature)
        canon = sorted((k, float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                       for k, v in axes.items())
        key = json.dumps([res.get("task"), res.get("quant"), canon], default=str)
        if key not in groups:
            groups[key] = Row(res.get("quant", "?"), method_label(res.get("quant", "?"), axes),
                              axes, [])
        groups[key].runs.append(res)
    for row in groups.values():
        row.runs.sort(key=lambda r: str(r.get("sig")))
    return list(groups.values())


def _matches(ref: Reference, row: Row) -> bool:
    return ref.matchable and ref.quant == row.quant and all(
        k in row.axes and _same(row.axes[k], v) for k, v in ref.match.items())


def build_sections(results: tp.Sequence[tp.Dict[str, tp.Any]],
                   references: tp.Sequence[Reference] = ()) -> tp.List[Section]:
    """Group runs into sections (task, model) of rows, attach references, order everything.

    Args:
        results: result.json dicts (:func:`load_results`).
        references: published numbers (:func:`load_references`); those of a section's task and
            model that match no row become rows of their own (ours shown as missing), those that
            cannot be matched (model or setting not stated in the source) become notes.
    """
    by_section: tp.Dict[tp.Tuple[str, str], tp.List[tp.Dict[str, tp.Any]]] = {}
    for res in results:
        model = res.get("axes", {}).get("task.model")
        model = model if isinstance(model, str) else None
        by_section.setdefault((res.get("task", "?"), model or ""), []).append(res)
    sections = []
    for (task, model), runs in sorted(by_section.items()):
        rows = _group(runs)
        present = {k for r in rows for k in r.axes}
        method_axes = {k for _, keys in METHODS.values() for k in keys}
        extra = sorted(k for k in present if k not in method_axes and k not in _DUPLICATES and
                       len({_order(r.axes[k]) for r in rows if k in r.axes}) > 1)
        # an unmatchable number whose model is not stated is noted under every model of its task
        refs = [r for r in references if r.task == task and
                ((r.model or "") == model or (not r.matchable and r.model is None))]
        notes = []
        for ref in refs:
            hits = [row for row in rows if _matches(ref, row) and row.reference is None]
            for row in hits:
                row.reference = ref
            if not hits and ref.matchable:
                axes = dict(ref.match)
                rows.append(Row(ref.quant, ref.label or method_label(ref.quant, axes), axes, [], ref))
            elif not ref.matchable:
                what = [f"{ref.metric} {_published(ref.value)}"] if ref.value is not None else []
                what += [f"{_published(ref.size_mb)} MB"] if ref.size_mb is not None else []
                what += [ref.note] if ref.note else []
                notes.append(f"{ref.label or METHODS.get(ref.quant, (ref.quant,))[0]}: "
                             f"{'; '.join(what)} ({ref.source}; {ref.provenance})")
        order = list(METHODS)
        rows.sort(key=lambda r: (order.index(r.quant) if r.quant in order else len(order), r.quant,
                                 [_order(r.axes.get(k)) for k in METHODS.get(r.quant, ("", ()))[1]],
                                 [_order(r.axes.get(k)) for k in extra], not r.runs, r.label))
        metric = str(runs[0].get("metric", "metric"))
        sections.append(Section(task, model or None, metric, bool(runs[0].get("lower_is_better")),
                                rows, extra, notes))
    return sections


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """``diffq-bench-table [--root outputs] [--task T] [--quant Q] [--grid G] [--format md|csv|latex]
    [--plot out.png] [--per-run] [-o FILE]``."""
    parser = argparse.ArgumentParser(prog="diffq-bench-table", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="outputs", help="run store root (paths.root)")
    parser.add_argument("--task", help="only runs of this task (task.name)")
    parser.add_argument("--quant", help="only runs of this quantizer (quant.name)")
    parser.add_argument("--grid", help="only runs launched by this grid (+grid=NAME)")
    parser.add_argument("--format", choices=FORMATS, default="md")
    parser.add_argument("-o", "--output", help="write the table to this file instead of stdout")
    parser.add_argument("--plot", help="also write the metric-vs-size plot (PNG) here")
    parser.add_argument("--reference", default=str(DEFAULT_REFERENCE_DIR),
                        help="folder of published numbers (*.yaml); 'none' to leave them out")
    parser.add_argument("--per-run", action="store_true",
                        help="one raw row per run with every varying axis and metric (no grouping)")
    args = parser.parse_args(argv)
    results = load_results(args.root, args.task, args.quant, args.grid)
    if not results:
        print(f"no finished runs under {Path(args.root) / 'xps'} match the filters", file=sys.stderr)
        raise SystemExit(1)
    refs = [] if args.reference.lower() == "none" else load_references(args.reference)
    if args.per_run:
        text = render(*build_table(results), args.format)
    else:
        sections = build_sections(results, refs)
        text = render_sections(sections, args.format, title=f"grid {args.grid}" if args.grid else None)
    if args.output:
        from . import io
        io.write_text(args.output, text)
    else:
        sys.stdout.write(text)
    if args.plot:
        from .plots import plot_sections
        plot_sections(build_sections(results, refs), args.plot,
                      title=f"grid {args.grid}" if args.grid else None)
