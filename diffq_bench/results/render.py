"""Printing paper tables: sections (and the flat per-run table) as md, latex or csv.

Pure functions of their inputs, so the same sections always give the same bytes.
"""
from __future__ import annotations

import csv
import io
import json
import math
import typing as tp

from .table import Section, format_axis, format_published, method_axes, order_key

FORMATS = ("md", "csv", "latex")
MISSING = "—"


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


def trade_off_notes(section: Section) -> tp.List[str]:
    """The paper's two claims, measured on this section: does DiffQ's size shrink monotonically
    as λ grows, and does DiffQ beat each QAT row at equal or smaller size?

    Only comparable rows are compared: a λ path holds DiffQ rows that differ in λ alone (same
    group size and same value of every other varying axis), and a QAT row is compared with the
    DiffQ rows that share its values of the section's extra axes. No claim is printed otherwise.
    """
    key, notes = f"test_{section.metric}", []
    diffq = [r for r in section.rows if r.quant == "diffq" and r.runs and
             r.mean("true_size_mb") is not None and r.mean(key) is not None]
    # the settings that tell one λ path from another (named in its note)
    varying = sorted(k for k in {k for r in diffq for k in r.axes}
                     if k not in _LAMBDA_AXES + ("group_size", "quant.group_size") and
                     len({_canon(r.axes.get(k)) for r in diffq}) > 1)
    paths: tp.Dict[str, tp.List[tp.Any]] = {}
    for row in diffq:
        rest = {k: _canon(v) for k, v in row.axes.items() if k not in _LAMBDA_AXES}
        paths.setdefault(json.dumps(rest, sort_keys=True), []).append(row)
    for _, rows in sorted(paths.items()):
        rows = sorted(rows, key=lambda r: order_key(r.axes.get("lambda")))
        lambdas = [order_key(r.axes.get("lambda")) for r in rows]
        if len(set(lambdas)) < 2 or len(set(lambdas)) != len(lambdas):
            continue  # one λ only, or rows that differ in something the axes do not show
        sizes = [r.mean("true_size_mb") for r in rows]
        mono = all(a > b for a, b in zip(sizes, sizes[1:]))
        path = ", ".join(f"λ={format_axis(r.axes.get('lambda'))}: {_size(z)} MiB"
                         for r, z in zip(rows, sizes))
        fixed = [f"g={format_axis(rows[0].axes.get('group_size'))}"] + [
            f"{k}={format_axis(rows[0].axes[k])}" for k in varying if rows[0].axes.get(k) is not None]
        notes.append(f"DiffQ {', '.join(fixed)}: size "
                     f"{'decreases strictly' if mono else 'does NOT decrease monotonically'} "
                     f"as λ grows ({path}).")
    sign = 1.0 if section.lower_is_better else -1.0
    for qat in (r for r in section.rows if r.quant == "qat" and r.runs):
        size, value = qat.mean("true_size_mb"), qat.mean(key)
        if size is None or value is None:
            continue
        peers = [r for r in diffq if all(_same_axis(r.axes.get(k), qat.axes.get(k))
                                         for k in section.extra_axes)]
        if not peers:
            continue  # no DiffQ run with the same settings: nothing comparable to say
        within = [r for r in peers if r.mean("true_size_mb") <= size]
        if not within:
            notes.append(f"{qat.label} ({_size(size)} MiB): no DiffQ run at or below this size.")
            continue
        best = min(within, key=lambda r: sign * r.mean(key))
        better = sign * best.mean(key) < sign * value
        notes.append(f"{qat.label} ({_size(size)} MiB, {section.metric} {_num(value)}): best DiffQ at "
                     f"≤ this size is {best.label} ({_size(best.mean('true_size_mb'))} MiB, "
                     f"{section.metric} {_num(best.mean(key))}): DiffQ "
                     f"{'better' if better else 'NOT better'}.")
    return notes


#: the axes a λ path varies (``quant.penalty`` is ``lambda`` under its quantizer name)
_LAMBDA_AXES = ("lambda", "quant.penalty")


def _same_axis(a: tp.Any, b: tp.Any) -> bool:
    return _canon(a) == _canon(b)


def _canon(value: tp.Any) -> str:
    # 10 and 10.0 are the same setting (as in the run signature)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    return json.dumps(value, sort_keys=True, default=str)


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
            "compressed_size_mb", "compression", "bits_per_weight", f"paper_{section.metric}",
            f"delta_{section.metric}", "paper_size_mb", "paper_source"]
    else:
        header = ["Method"] + section.extra_axes + [f"{section.metric} {arrow}"] + (
            ["seeds"] if seeds else []) + ["size MiB", "zlib MiB", "compr.", "bits/w",
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
        # an axis this method leaves unset (null) is blank in CSV and "—" in the printed tables
        unset = "" if fmt == "csv" else MISSING
        extras = [unset if row.axes.get(k) is None else format_axis(row.axes[k])
                  for k in section.extra_axes]
        if fmt == "csv":
            vals = [mean, row.std(key), len(row.runs), row.mean("true_size_mb"),
                    row.mean("compressed_size_mb"), row.mean("compression"), row.mean("bits_per_weight"),
                    ref_value, delta, None if ref is None else ref.size_mb]
            cells.append([" ".join(str(r.get("sig")) for r in row.runs), section.task, row.quant,
                          section.model or "", row.label] + extras +
                         ["" if v is None else _raw(v) for v in vals] + [ref.source if ref else ""])
            continue
        std = row.std(key)
        metric = _num(mean) + (f" ± {_num(std)}" if std is not None else "")
        compr = row.mean("compression")
        paper = MISSING if ref_value is None else format_published(ref_value)
        if ref is not None and ref_value is not None and ref.metric != section.metric:
            paper += f" ({ref.metric})"
        cells.append([row.label] + extras + [metric] + ([str(len(row.runs))] if seeds else []) + [
            _size(row.mean("true_size_mb")), _size(row.mean("compressed_size_mb")),
            MISSING if compr is None else f"{compr:.1f}×",
            _bits(row.mean("bits_per_weight")), paper,
            MISSING if delta is None else f"{delta:+.2f}",
            MISSING if ref is None or ref.size_mb is None else format_published(ref.size_mb)])
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
        notes = [f"test {section.metric} ({direction} is better), mean ± std over seeds; size MiB = "
                 "bytes of the packed quantized model (quantized.th) / 2^20; zlib MiB = the same bytes "
                 "compressed by zlib (default level), as the official package reports a compressed "
                 "size; compr. = float32 size / size; bits/w = mean stored bits per "
                 "quantized weight (32: the float model); Δ = ours − paper; paper MB = the size as "
                 "the source prints it; "
                 f"{MISSING} = missing (bits/w: nothing quantized)."] + [f"Source: {s}" for s in sources]
        conventions = sorted({run["penalty"]["convention"] for row in section.rows for run in row.runs
                              if "lambda" in method_axes(row.quant) and "penalty" in run})
        notes += [f"λ convention: {c}" for c in conventions]
        notes += [f"Not matched to a row: {n}" for n in section.notes]
        notes += [f"Measured: {n}" for n in trade_off_notes(section)]
        if fmt == "md":
            parts.append(f"## {section.title}\n\n" + _md(header, cells) + "\n" +
                         "".join(f"- {n}\n" for n in notes))
        else:
            parts.append(f"% {section.title}\n" + _latex(header, cells) +
                         "".join(f"% {n}\n" for n in notes))
    return "\n".join(parts)
