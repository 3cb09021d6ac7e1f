"""Trade-off plots: test metric vs true model size (MB, log axis), Pareto front per method.

One PNG per call (``diffq-bench-table --grid NAME --plot out.png``), one panel per section
(benchmark) of :func:`diffq_bench.results.build_sections`. Each method's configurations are dots
(error bars: std over seeds), its Pareto front a line; DiffQ dots are labelled with their λ
(one marker per group size);
published numbers that state a size are hollow black markers.
"""
from __future__ import annotations

import io
import math
import typing as tp
from pathlib import Path

from ..io import write_bytes
from .table import Section, display

Point = tp.Tuple[float, float]


def pareto_front(points: tp.Sequence[Point], lower_is_better: bool) -> tp.List[Point]:
    """Points (size, metric) not dominated by another (smaller-or-equal size and better-or-equal
    metric, one strictly), sorted by size.

    Args:
        points: (size, metric) pairs; non-finite ones are ignored.
        lower_is_better: True for PPL-like metrics, False for accuracy/SDR.
    """
    sign = 1.0 if lower_is_better else -1.0
    finite = sorted({(s, m) for s, m in points if math.isfinite(s) and math.isfinite(m)},
                    key=lambda p: (p[0], sign * p[1]))
    front: tp.List[Point] = []
    for size, metric in finite:
        # sorted by size, so a point is on the front iff it beats every smaller one's metric
        if not front or sign * metric < sign * front[-1][1]:
            front.append((size, metric))
    return front


def plot_sections(sections: tp.Sequence[Section], path: tp.Union[str, Path],
                  title: tp.Optional[str] = None) -> Path:
    """Write one PNG with a metric-vs-size panel per section; returns its path.

    Args:
        sections: from :func:`diffq_bench.results.build_sections`.
        path: output PNG (written atomically: temporary file then rename).
        title: figure title (e.g. the grid name).
    Raises:
        ValueError: no section has a run with both a size and a metric to plot.
    """
    import matplotlib
    matplotlib.use("Agg")  # files only, no display; must happen before pyplot is imported
    import matplotlib.pyplot as plt

    panels = [s for s in sections if any(r.mean("true_size_mb") is not None and
                                         r.mean(f"test_{s.metric}") is not None for r in s.rows)]
    if not panels:
        raise ValueError("nothing to plot: no run has both true_size_mb and the test metric")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.6 * nrows), squeeze=False)
    for ax, section in zip(axes.flat, panels):
        _panel(ax, section)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    # one legend for the figure, below the panels (methods keep their colour in every panel)
    legend: tp.Dict[str, tp.Any] = {}
    for ax in axes.flat[:len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    ncol = min(len(legend), 5 if ncols == 1 else 9)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title)
    legend_rows = math.ceil(len(legend) / max(ncol, 1))
    fig.tight_layout(rect=(0.0, min(0.4, 0.045 * legend_rows / nrows * 2), 1.0, 1.0))
    path = Path(path)
    buffer = io.BytesIO()
    # no timestamp in the metadata: same inputs, same bytes
    fig.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
    return path


_GROUP_MARKERS = ("o", "s", "^", "D", "v")


def _series(quant: str, rows: tp.Sequence[tp.Any]) -> tp.List[tp.Tuple[str, str, tp.List[tp.Any]]]:
    """(legend label, marker, rows) per drawn series: one per value of the method's
    ``display.series_axis`` (DiffQ: one per group size) when it has several."""
    shown = display(quant)
    axis = shown.series_axis
    if axis is None:
        return [(shown.label, "o", list(rows))]
    groups = sorted({r.axes.get(axis) for r in rows}, key=lambda g: (g is None, str(g).zfill(8)))
    if len(groups) < 2:
        return [(shown.label, "o", list(rows))]
    label = dict(shown.axes).get(axis, axis + "={}")
    return [(f"{shown.label} {label.format(g)}", _GROUP_MARKERS[i % len(_GROUP_MARKERS)],
             [r for r in rows if r.axes.get(axis) == g]) for i, g in enumerate(groups)]


def _panel(ax: tp.Any, section: Section) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    key = f"test_{section.metric}"
    by_quant: tp.Dict[str, tp.List[tp.Any]] = {}
    for row in section.rows:
        if row.runs:
            by_quant.setdefault(row.quant, []).append(row)
    for quant, rows in by_quant.items():
        color = display(quant).color
        all_pts = []
        for n, (label, marker, series) in enumerate(_series(quant, rows)):
            pts = [(r.mean("true_size_mb"), r.mean(key), r.std(key), r) for r in series]
            pts = [p for p in pts if p[0] is not None and p[1] is not None]
            if not pts:
                continue
            all_pts += pts
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts],
                        fmt=marker, color=color, ms=5, capsize=2, label=label)
            # labels of alternate series above and below their points, so they overlap less
            offset = (4, 3) if n % 2 == 0 else (4, -9)
            for size, metric, _, row in pts:
                text = _point_label(quant, row.axes)
                if text:
                    ax.annotate(text, (size, metric), textcoords="offset points", xytext=offset,
                                fontsize=7, color=color)
        front = pareto_front([(p[0], p[1]) for p in all_pts], section.lower_is_better)
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=color, lw=1.2, alpha=0.8)
    refs = [r.reference for r in section.rows if r.reference is not None and
            r.reference.value is not None and r.reference.size_mb is not None and
            r.reference.metric == section.metric]
    if refs:
        ax.scatter([r.size_mb for r in refs], [r.value for r in refs], marker="*", s=90,
                   facecolors="none", edgecolors="black", label="paper")
    ax.set_xscale("log")
    # plain numbers at 1-2-5 steps instead of crowded 10^k minor labels
    ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("true model size (MB, log scale)")
    better = "lower" if section.lower_is_better else "higher"
    ax.set_ylabel(f"test {section.metric} ({better} is better)")
    ax.set_title(section.title)
    ax.grid(True, which="both", alpha=0.3)


def _point_label(quant: str, axes: tp.Mapping[str, tp.Any]) -> str:
    """The method's ``display.point`` annotation of a point (numeric values only)."""
    point = display(quant).point
    if point is None:
        return ""
    value = axes.get(point[0])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    return point[1].format(value)
