"""Paper tables as data: methods' labels, published numbers, rows and sections.

Runs (``result.json`` dicts, :mod:`diffq_bench.results.load`) are grouped into one section per
benchmark (task, and model when the task has several), runs differing only by seed into one row
(mean ± std), rows ordered by method (the order of ``QUANTIZERS``) then by the method's axes (bits,
λ, group size). A method's label and axes come from its quantizer class's ``display``.
Published numbers that match a row are attached to it; those without our run become rows of their
own. :mod:`diffq_bench.results.render` prints sections, :mod:`diffq_bench.results.plots` draws them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import typing as tp

from ..quant import QUANTIZERS
from ..quant.base import Display

#: metrics shown first in the per-run table, in this order (others follow alphabetically)
METRIC_ORDER = ("true_size_mb", "compression", "bits_per_weight", "wall_time_s")
#: axes averaged over (a row is a group of runs that differ only by these)
SEED_AXES = ("seed", "quant.seed")
#: aliases of method axes (the same value under two names), never shown as extra columns
_DUPLICATES = ("quant.penalty", "quant.group_size", "quant.name", "task.name", "task.model")


def order_key(value: tp.Any) -> tp.Tuple[int, float, str]:
    """Sort key mixing None, numbers and strings deterministically (numbers numerically)."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "") if not math.isnan(value) else (1, math.inf, "nan")
    return (2, 0.0, str(value))


def format_axis(value: tp.Any) -> str:
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_published(value: float) -> str:
    """A published number as printed in its source: 18 stays 18, 18.0 stays 18.0, 91.72 stays 91.72."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    return f"{value:.1f}" if value == int(value) else f"{value:g}"


@dataclasses.dataclass
class Reference:
    """A published number (``results/reference/*.yaml`` entry); ``value`` None means a claim only."""
    task: str
    quant: str
    metric: str
    source: str
    provenance: str
    model: tp.Optional[str] = None
    match: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict)
    value: tp.Optional[float] = None
    size_mb: tp.Optional[float] = None
    label: tp.Optional[str] = None
    note: tp.Optional[str] = None
    matchable: bool = True


@dataclasses.dataclass
class Row:
    """Runs of one configuration (differing only by seed), or a published number we lack."""
    quant: str
    label: str
    axes: tp.Dict[str, tp.Any]
    runs: tp.List[tp.Dict[str, tp.Any]]
    reference: tp.Optional[Reference] = None

    def values(self, key: str) -> tp.List[float]:
        return [float(r["metrics"][key]) for r in self.runs
                if isinstance(r.get("metrics", {}).get(key), (int, float))]

    def mean(self, key: str) -> tp.Optional[float]:
        vals = self.values(key)
        return sum(vals) / len(vals) if vals else None

    def std(self, key: str) -> tp.Optional[float]:
        vals = self.values(key)
        return statistics.stdev(vals) if len(vals) > 1 else None


@dataclasses.dataclass
class Section:
    """One benchmark (task, model): its rows, metric and the extra axes that vary."""
    task: str
    model: tp.Optional[str]
    metric: str
    lower_is_better: bool
    rows: tp.List[Row]
    extra_axes: tp.List[str]
    notes: tp.List[str]

    @property
    def title(self) -> str:
        return f"{self.task} ({self.model})" if self.model else self.task


def display(quant: str) -> Display:
    """How a method is shown (its quantizer class's ``display``; unknown names as themselves)."""
    cls = QUANTIZERS.get(quant)
    return cls.display if cls is not None else Display(quant)


def method_axes(quant: str) -> tp.Tuple[str, ...]:
    """The axes that identify one configuration of the method."""
    return tuple(key for key, _ in display(quant).axes)


def method_label(quant: str, axes: tp.Mapping[str, tp.Any]) -> str:
    """Human name of a configuration: ``QAT 4 bits``, ``DiffQ (λ=1, g=16)``."""
    shown = display(quant)
    parts = [fmt.format(format_axis(axes[k])) for k, fmt in shown.axes if axes.get(k) is not None]
    if not parts:
        return shown.label
    if shown.inline:
        return f"{shown.label} {parts[0]}" + (f" ({', '.join(parts[1:])})" if parts[1:] else "")
    return f"{shown.label} ({', '.join(parts)})"


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
                                            [order_key(r.get("axes", {}).get(k)) for k in varying],
                                            r.get("sig", ""))):
        row = [r.get("sig"), r.get("task"), r.get("quant")]
        row += [r.get("axes", {}).get(k) for k in varying]
        row += [r.get("metrics", {}).get(k) for k in first + rest]
        rows.append(row)
    return header, rows


# ---------------------------------------------------------------------------------------------
# Paper tables: sections of grouped rows with references

def eval_subset(result: tp.Mapping[str, tp.Any]) -> int:
    """The ``task.eval_subset`` a run was tested with (0: the whole test set)."""
    value = (result.get("axes") or {}).get("task.eval_subset")
    return int(value) if isinstance(value, (int, float)) and value > 0 else 0


def _same(a: tp.Any, b: tp.Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


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
        known_axes = {k for quant in QUANTIZERS for k in method_axes(quant)}
        extra = sorted(k for k in present if k not in known_axes and k not in _DUPLICATES and
                       len({order_key(r.axes[k]) for r in rows if k in r.axes}) > 1)
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
                what = [f"{ref.metric} {format_published(ref.value)}"] if ref.value is not None else []
                what += [f"{format_published(ref.size_mb)} MB"] if ref.size_mb is not None else []
                what += [ref.note] if ref.note else []
                notes.append(f"{ref.label or display(ref.quant).label}: "
                             f"{'; '.join(what)} ({ref.source}; {ref.provenance})")
        order = list(QUANTIZERS)
        rows.sort(key=lambda r: (order.index(r.quant) if r.quant in order else len(order), r.quant,
                                 [order_key(r.axes.get(k)) for k in method_axes(r.quant)],
                                 [order_key(r.axes.get(k)) for k in extra], not r.runs, r.label))
        subsets = sorted({eval_subset(run) for row in rows for run in row.runs} - {0})
        if subsets:  # e.g. +preset=debug runs: their metric is not a real result
            for row in rows:
                if any(eval_subset(run) for run in row.runs):
                    row.label += " †"
            notes.append(f"† tested on the first {'/'.join(map(str, subsets))} evaluation items only "
                         "(task.eval_subset, e.g. +preset=debug): not comparable with a full test set")
        metric = str(runs[0].get("metric", "metric"))
        sections.append(Section(task, model or None, metric, bool(runs[0].get("lower_is_better")),
                                rows, extra, notes))
    return sections
