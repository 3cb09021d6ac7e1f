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
import csv
import dataclasses
import io
import json
import math
import statistics
import sys
import typing as tp
from pathlib import Path

FORMATS = ("md", "csv", "latex")
MISSING = "—"
#: metrics shown first in the per-run table, in this order (others follow alphabetically)
METRIC_ORDER = ("true_size_mb", "compression", "bits_per_weight", "wall_time_s")
#: axes averaged over (a row is a group of runs that differ only by these)
SEED_AXES = ("seed", "quant.seed")
#: method display order, names, and the axes that identify a configuration of the method
METHODS: tp.Dict[str, tp.Tuple[str, tp.Tuple[str, ...]]] = {
    "none": ("Float", ()),
    "qat": ("QAT", ("quant.bits",)),
    "lsq": ("LSQ", ("quant.bits",)),
    "quant_noise": ("Quant-Noise", ("quant.bits", "quant.p")),
    "quant_noise_ipq": ("Quant-Noise iPQ", ("quant.n_centroids", "quant.block_size", "quant.p")),
    "dsq": ("DSQ", ("quant.bits", "quant.act_bits")),
    "oneshot_mpq": ("One-shot MPQ", ("quant.budget_kind", "quant.budget")),
    "diffq": ("DiffQ", ("lambda", "group_size")),
}
#: aliases of method axes (the same value under two names), never shown as extra columns
_DUPLICATES = ("quant.penalty", "quant.group_size", "quant.name", "task.name", "task.model")
_SHORT = {"quant.bits": "{} bits", "quant.p": "p={}", "quant.n_centroids": "K={}",
          "quant.block_size": "block {}", "quant.act_bits": "A{}", "quant.budget_kind": "{}",
          "quant.budget": "≤{}", "lambda": "λ={}", "group_size": "g={}"}
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


def render(header: tp.Sequence[str], rows: tp.Sequence[tp.Sequence[tp.Any]], fmt: str) -> str:
    """Render a table of raw values as ``md``, ``csv`` or ``latex``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "csv":
        return _csv(header, [["" if v is None else _raw(v) for v in row] for row in rows])
    cells = [[MISSING if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row]
             for row in rows]
    return _md(header, cells) if fmt == "md" else _latex(header, cells)


def _raw(value: tp.Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _csv(header: tp.Sequence[str], rows: tp.Sequence[tp.Sequence[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _md(header: tp.Sequence[str], rows: tp.Sequence[tp.Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_LATEX = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
          "{": "\\{", "}": "\\}", "λ": "$\\lambda$", "±": "$\\pm$", "×": "$\\times$",
          "≤": "$\\leq$", "—": "--", "Δ": "$\\Delta$", "↓": "$\\downarrow$", "↑": "$\\uparrow$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and spell the few unicode symbols the tables use."""
    return "".join(_LATEX.get(ch, ch) for ch in text)


def _latex(header: tp.Sequence[str], rows: tp.Sequence[tp.Sequence[str]]) -> str:
    lines = ["\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", "\\toprule",
             " & ".join(latex_escape(h) for h in header) + " \\\\", "\\midrule"]
    lines += [" & ".join(latex_escape(c) for c in row) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _order(value: tp.Any) -> tp.Tuple[int, float, str]:
    """Sort key mixing None, numbers and strings deterministically (numbers numerically)."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "") if not math.isnan(value) else (1, math.inf, "nan")
    return (2, 0.0, str(value))


def _same(a: tp.Any, b: tp.Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _fmt_axis(value: tp.Any) -> str:
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# Paper tables: sections of grouped rows with references

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


def method_label(quant: str, axes: tp.Mapping[str, tp.Any]) -> str:
    """Human name of a configuration: ``QAT 4 bits``, ``DiffQ (λ=1, g=16)``."""
    name, keys = METHODS.get(quant, (quant, ()))
    parts = [_SHORT[k].format(_fmt_axis(axes[k])) for k in keys if axes.get(k) is not None]
    if not parts:
        return name
    if quant in ("qat", "lsq") or (quant == "quant_noise" and len(parts) == 2):
        return f"{name} {parts[0]}" + (f" ({', '.join(parts[1:])})" if parts[1:] else "")
    return f"{name} ({', '.join(parts)})"


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


def trade_off_notes(section: Section) -> tp.List[str]:
    """The paper's two claims, measured on this section: does DiffQ's size shrink monotonically
    as λ grows (per group size), and does DiffQ beat each QAT row at equal or smaller size?"""
    key, notes = f"test_{section.metric}", []
    diffq = [r for r in section.rows if r.quant == "diffq" and r.runs and
             r.mean("true_size_mb") is not None and r.mean(key) is not None]
    for group in sorted({_order(r.axes.get("group_size")) for r in diffq}):
        rows = sorted((r for r in diffq if _order(r.axes.get("group_size")) == group),
                      key=lambda r: _order(r.axes.get("lambda")))
        if len(rows) < 2:
            continue
        sizes = [r.mean("true_size_mb") for r in rows]
        mono = all(a > b for a, b in zip(sizes, sizes[1:]))
        path = ", ".join(f"λ={_fmt_axis(r.axes.get('lambda'))}: {_size(z)} MB"
                         for r, z in zip(rows, sizes))
        notes.append(f"DiffQ g={_fmt_axis(rows[0].axes.get('group_size'))}: size "
                     f"{'decreases strictly' if mono else 'does NOT decrease monotonically'} "
                     f"as λ grows ({path}).")
    sign = 1.0 if section.lower_is_better else -1.0
    for qat in (r for r in section.rows if r.quant == "qat" and r.runs):
        size, value = qat.mean("true_size_mb"), qat.mean(key)
        if size is None or value is None:
            continue
        within = [r for r in diffq if r.mean("true_size_mb") <= size]
        if not within:
            notes.append(f"{qat.label} ({_size(size)} MB): no DiffQ run at or below this size.")
            continue
        best = min(within, key=lambda r: sign * r.mean(key))
        better = sign * best.mean(key) < sign * value
        notes.append(f"{qat.label} ({_size(size)} MB, {section.metric} {_num(value)}): best DiffQ at "
                     f"≤ this size is {best.label} ({_size(best.mean('true_size_mb'))} MB, "
                     f"{section.metric} {_num(best.mean(key))}): DiffQ "
                     f"{'better' if better else 'NOT better'}.")
    return notes


def _published(value: float) -> str:
    """A published number as printed in its source: 18.0 stays 18.0, 91.72 stays 91.72."""
    value = float(value)
    return f"{value:.1f}" if value == int(value) else f"{value:g}"


def _num(value: tp.Optional[float], digits: int = 2) -> str:
    if value is None:
        return MISSING
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.{digits}f}"


def _bits(value: tp.Optional[float]) -> str:
    # 0 means no weight was quantized (the float baseline): there is no quantized bit width to show
    return MISSING if not value else _num(value)


def _size(value: tp.Optional[float]) -> str:
    if value is None:
        return MISSING
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def section_table(section: Section, fmt: str) -> tp.Tuple[tp.List[str], tp.List[tp.List[str]]]:
    """Header and cells of one section; ``csv`` keeps raw numbers and separate mean/std columns."""
    key = f"test_{section.metric}"
    arrow = "↓" if section.lower_is_better else "↑"
    seeds = any(len(r.runs) > 1 for r in section.rows)
    if fmt == "csv":
        header = ["runs", "task", "quant", "model", "method"] + section.extra_axes + [
            f"{section.metric}_mean", f"{section.metric}_std", "n_seeds", "true_size_mb",
            "compression", "bits_per_weight", f"paper_{section.metric}", f"delta_{section.metric}",
            "paper_size_mb", "paper_source"]
    else:
        header = ["Method"] + section.extra_axes + [f"{section.metric} {arrow}"] + (
            ["seeds"] if seeds else []) + ["size MB", "compr.", "bits/w",
                                           f"paper {section.metric}", "Δ", "paper MB"]
    cells = []
    for row in section.rows:
        ref = row.reference
        mean = row.mean(key)
        ref_value = mean_ref = None
        if ref is not None and ref.value is not None:
            ref_value = float(ref.value)
            # a published number in another metric (SDR next to our nSDR) is compared with ours of it
            mean_ref = mean if ref.metric == section.metric else row.mean(f"test_{ref.metric}")
        delta = mean_ref - ref_value if ref_value is not None and mean_ref is not None else None
        extras = [_fmt_axis(row.axes[k]) if k in row.axes else "" for k in section.extra_axes]
        if fmt == "csv":
            vals = [mean, row.std(key), len(row.runs), row.mean("true_size_mb"),
                    row.mean("compression"), row.mean("bits_per_weight"), ref_value, delta,
                    None if ref is None else ref.size_mb]
            cells.append([" ".join(str(r.get("sig")) for r in row.runs), section.task, row.quant,
                          section.model or "", row.label] + extras +
                         ["" if v is None else _raw(v) for v in vals] + [ref.source if ref else ""])
            continue
        std = row.std(key)
        metric = _num(mean) + (f" ± {_num(std)}" if std is not None else "")
        compr = row.mean("compression")
        paper = MISSING if ref_value is None else _published(ref_value)
        if ref is not None and ref_value is not None and ref.metric != section.metric:
            paper += f" ({ref.metric})"
        cells.append([row.label] + extras + [metric] + ([str(len(row.runs))] if seeds else []) + [
            _size(row.mean("true_size_mb")), MISSING if compr is None else f"{compr:.1f}×",
            _bits(row.mean("bits_per_weight")), paper,
            MISSING if delta is None else f"{delta:+.2f}",
            MISSING if ref is None or ref.size_mb is None else _published(ref.size_mb)])
    return header, cells


def render_sections(sections: tp.Sequence[Section], fmt: str, title: tp.Optional[str] = None) -> str:
    """All sections in one document: md/latex with a heading, notes and sources per section;
    csv as one table (sections concatenated, union of the columns)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "csv":
        tables = [section_table(s, "csv") for s in sections]
        header: tp.List[str] = []
        for h, _ in tables:
            header += [c for c in h if c not in header]
        rows = [[dict(zip(h, row)).get(c, "") for c in header] for h, body in tables for row in body]
        return _csv(header, rows)
    parts = []
    if title:
        parts.append(f"# {title}\n" if fmt == "md" else f"% {title}\n")
    for section in sections:
        header, cells = section_table(section, fmt)
        direction = "lower" if section.lower_is_better else "higher"
        sources = sorted({r.reference.source + (f" ({r.reference.note})" if r.reference.note else "")
                          for r in section.rows if r.reference is not None})
        notes = [f"test {section.metric} ({direction} is better), mean ± std over seeds; size MB = "
                 "bytes of the packed quantized model / 2^20; bits/w = mean stored bits per "
                 "quantized weight; Δ = ours − paper; "
                 f"{MISSING} = missing (bits/w: nothing quantized)."] + [f"Source: {s}" for s in sources]
        notes += [f"Not matched to a row: {n}" for n in section.notes]
        notes += [f"Measured: {n}" for n in trade_off_notes(section)]
        if fmt == "md":
            parts.append(f"## {section.title}\n\n" + _md(header, cells) + "\n" +
                         "".join(f"- {n}\n" for n in notes))
        else:
            parts.append(f"% {section.title}\n" + _latex(header, cells) +
                         "".join(f"% {n}\n" for n in notes))
    return "\n".join(parts)


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
        from .xp import atomic_write_text
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    if args.plot:
        from .plots import plot_sections
        plot_sections(build_sections(results, refs), args.plot,
                      title=f"grid {args.grid}" if args.grid else None)
