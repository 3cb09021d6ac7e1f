"""What a run and a sweep print on the console, from the runs' ``result.json``.

A single run ends with :func:`format_row` (a one-row markdown table); a sweep prints
:func:`format_line` (the same cells on one line) for each run as it finishes, and ends with
:func:`sweep_table`, the table ``diffq-bench-table`` renders for exactly the sweep's runs.
"""
from __future__ import annotations

import typing as tp
from pathlib import Path

from .load import DEFAULT_REFERENCE_DIR, load_references
from .render import render, render_sections
from .table import build_sections, eval_subset

#: the columns of a run's row: (metric key, title); "test" is the task's test metric
ROW_COLUMNS = (("test", "test {metric}"), ("true_size_mb", "size (MiB)"),
               ("compression", "compression"), ("bits_per_weight", "bits/weight"),
               ("wall_time_s", "wall time (s)"))
#: how each column's value is printed (size: bytes of the exported quantized.th / 2^20)
#: (test metric: 4 significant digits, trailing zeros kept, so 243.0 does not read as an integer)
ROW_FORMATS = {"test": "{:#.4g}", "compression": "{:.2f}×", "bits_per_weight": "{:.2f}", "wall_time_s": "{:.1f}"}


def row_cells(result: tp.Mapping[str, tp.Any]) -> tp.Tuple[tp.List[str], tp.List[tp.Optional[str]]]:
    """Titles and printed values of a run's metrics (:data:`ROW_COLUMNS`; None: not measured).

    Args:
        result: a run's ``result.json`` (needs ``metric`` and ``metrics``).
    """
    metric = result["metric"]
    metrics = result["metrics"]
    head, cells = [], []
    for key, title in ROW_COLUMNS:
        name = f"test_{metric}" if key == "test" else key
        head.append(title.format(metric=metric))
        value = metrics.get(name)
        cells.append(None if value is None else ROW_FORMATS.get(key, "{:.4g}").format(value))
    return head, cells


def format_row(result: tp.Mapping[str, tp.Any]) -> str:
    """The one-row markdown table printed at the end of a run (or for a finished run); a run
    tested on a subset (``task.eval_subset``, e.g. ``+preset=debug``) gets a line saying so."""
    head, cells = row_cells(result)
    text = render(["run", "task", "quant"] + head, [[result["sig"], result["task"], result["quant"]] + cells],
                  "md").rstrip("\n")
    subset = eval_subset(result)
    if subset:
        text += f"\ntested on the first {subset} items only (task.eval_subset={subset}): not a real result"
    return text


def format_line(result: tp.Mapping[str, tp.Any]) -> str:
    """The cells of :func:`format_row` on one line (``test top1 91.2 | size (MiB) 0.33 | ...``),
    as a sweep prints each finished run; ``""`` for a result without metrics."""
    if "metric" not in result or not isinstance(result.get("metrics"), tp.Mapping):
        return ""
    head, cells = row_cells(result)
    line = " | ".join(f"{title} {'—' if cell is None else cell}" for title, cell in zip(head, cells))
    subset = eval_subset(result)
    return line + (f" | tested on the first {subset} items only" if subset else "")


def sweep_table(results: tp.Sequence[tp.Dict[str, tp.Any]], grid: tp.Optional[str] = None,
                reference_dir: tp.Optional[tp.Union[str, Path]] = DEFAULT_REFERENCE_DIR) -> str:
    """The markdown table ``diffq-bench-table [--grid GRID]`` prints for these runs (same sections,
    published numbers and notes); results without a metric (not a diffq-bench run) are left out.

    Args:
        results: the runs' ``result.json`` dicts.
        grid: the grid the sweep ran (the table's title), None for a plain ``-m`` sweep.
        reference_dir: folder of published numbers (None: leave them out).
    """
    runs = [r for r in results if "metric" in r and isinstance(r.get("metrics"), tp.Mapping)]
    if not runs:
        return ""
    refs = load_references(reference_dir)
    return render_sections(build_sections(runs, refs), "md", title=f"grid {grid}" if grid else None)
