"""Collect run folders (``<root>/xps/*/result.json``) into one table: markdown, CSV or LaTeX.

Minimal version owned by the runner until the tables engineer takes it over: one row per finished
run, one column per config axis that varies between the selected runs, then the metrics.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import typing as tp
from pathlib import Path

FORMATS = ("md", "csv", "latex")
#: metrics shown first, in this order (others follow alphabetically)
METRIC_ORDER = ("true_size_mb", "compression", "bits_per_weight", "wall_time_s")


def load_results(root: tp.Union[str, Path], task: tp.Optional[str] = None,
                 quant: tp.Optional[str] = None, grid: tp.Optional[str] = None
                 ) -> tp.List[tp.Dict[str, tp.Any]]:
    """Read every readable ``result.json`` under ``root/xps``, filtered.

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
        if grid and grid not in res.get("grids", []):
            continue
        out.append(res)
    return out


def build_table(results: tp.Sequence[tp.Dict[str, tp.Any]]
                ) -> tp.Tuple[tp.List[str], tp.List[tp.List[tp.Any]]]:
    """Header and rows: task, quant, the varying axes, the test metric, then the other metrics."""
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
                                            json.dumps([r.get("axes", {}).get(k) for k in varying]))):
        row = [r.get("sig"), r.get("task"), r.get("quant")]
        row += [r.get("axes", {}).get(k) for k in varying]
        row += [r.get("metrics", {}).get(k) for k in first + rest]
        rows.append(row)
    return header, rows


def _cell(value: tp.Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(header: tp.Sequence[str], rows: tp.Sequence[tp.Sequence[tp.Any]], fmt: str) -> str:
    """Render a table as ``md``, ``csv`` or ``latex``."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
        return buf.getvalue()
    cells = [[_cell(v) for v in row] for row in rows]
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        def esc(text: str) -> str:
            for char in "\\&%$#_{}":
                text = text.replace(char, "\\" + char)
            return text
        lines = ["\\begin{tabular}{" + "l" * len(header) + "}", "\\toprule",
                 " & ".join(esc(h) for h in header) + " \\\\", "\\midrule"]
        lines += [" & ".join(esc(c) for c in row) + " \\\\" for row in cells]
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """``diffq-bench-table [--root outputs] [--task T] [--quant Q] [--grid G] [--format md|csv|latex]``."""
    parser = argparse.ArgumentParser(prog="diffq-bench-table", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="outputs", help="run store root (paths.root)")
    parser.add_argument("--task")
    parser.add_argument("--quant")
    parser.add_argument("--grid")
    parser.add_argument("--format", choices=FORMATS, default="md")
    parser.add_argument("-o", "--output", help="write the table to this file instead of stdout")
    args = parser.parse_args(argv)
    results = load_results(args.root, args.task, args.quant, args.grid)
    if not results:
        print(f"no finished runs under {Path(args.root) / 'xps'} match the filters", file=sys.stderr)
        raise SystemExit(1)
    text = render(*build_table(results), args.format)
    if args.output:
        from .xp import atomic_write_text
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
