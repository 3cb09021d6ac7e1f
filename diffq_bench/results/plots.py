"""Trade-off plots: test metric vs true model size (MiB, log axis), Pareto front per method.

One PNG per call (``diffq-bench-table --grid NAME --plot out.png``), one panel per section
(benchmark) of :func:`diffq_bench.results.build_sections`. Each method's configurations are dots
(error bars: std over seeds), its Pareto front a line; DiffQ dots are labelled with their λ
(one marker per group size, the same in every panel, named in the legend even when a panel has one
group size); published numbers that state a size are hollow black markers. Point labels are placed
greedily so that they neither overlap nor leave the panel. A metric spanning more than
:data:`LOG_RANGE` (a diverged debug run at PPL 80,000 next to PPL 240) gets a log axis, and a
percentage axis stops at 100.
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
    import matplotlib.pyplot as plt

    fig = build_figure(sections, title)
    path = Path(path)
    buffer = io.BytesIO()
    # no timestamp in the metadata: same inputs, same bytes
    fig.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
    return path


def build_figure(sections: tp.Sequence[Section], title: tp.Optional[str] = None) -> tp.Any:
    """The matplotlib figure :func:`plot_sections` writes (the caller closes it).

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
    markers = _series_markers(panels)
    labels = [_panel(ax, section, markers) for ax, section in zip(axes.flat, panels)]
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
    for ax, points in zip(axes.flat, labels):  # once the layout is final: the label boxes are in pixels
        _place_labels(ax, points)
    return fig


_GROUP_MARKERS = ("o", "s", "^", "D", "v")
#: max/min of a panel's metric beyond which its axis is logarithmic
LOG_RANGE = 20.0
#: metrics in percent: their axis never goes past 100
PERCENT_METRICS = ("top1", "top5")


def _series_markers(sections: tp.Sequence[Section]) -> tp.Dict[tp.Tuple[str, tp.Any], str]:
    """One marker per (method, value of its series axis) for the whole figure, so that a DiffQ
    g=16 run has the same marker (and legend entry) in every panel."""
    values: tp.Dict[str, tp.Set[tp.Any]] = {}
    for section in sections:
        for row in section.rows:
            axis = display(row.quant).series_axis
            if axis is not None and row.runs:
                values.setdefault(row.quant, set()).add(row.axes.get(axis))
    return {(quant, value): _GROUP_MARKERS[i % len(_GROUP_MARKERS)]
            for quant, found in values.items()
            for i, value in enumerate(sorted(found, key=lambda g: (g is None, str(g).zfill(8))))}


def _series(quant: str, rows: tp.Sequence[tp.Any], markers: tp.Mapping[tp.Tuple[str, tp.Any], str]
            ) -> tp.List[tp.Tuple[str, str, tp.List[tp.Any]]]:
    """(legend label, marker, rows) per drawn series: one per value of the method's
    ``display.series_axis`` (DiffQ: one per group size, always named: ``DiffQ g=16``)."""
    shown = display(quant)
    axis = shown.series_axis
    if axis is None:
        return [(shown.label, "o", list(rows))]
    groups = sorted({r.axes.get(axis) for r in rows}, key=lambda g: (g is None, str(g).zfill(8)))
    label = dict(shown.axes).get(axis, axis + "={}")
    return [(shown.label if g is None else f"{shown.label} {label.format(g)}", markers.get((quant, g), "o"),
             [r for r in rows if r.axes.get(axis) == g]) for g in groups]


def _panel(ax: tp.Any, section: Section, markers: tp.Mapping[tp.Tuple[str, tp.Any], str]
           ) -> tp.List[tp.Tuple[float, float, str, str]]:
    """Draw one section; returns the point labels to place (:func:`_place_labels`)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    key = f"test_{section.metric}"
    by_quant: tp.Dict[str, tp.List[tp.Any]] = {}
    for row in section.rows:
        if row.runs:
            by_quant.setdefault(row.quant, []).append(row)
    labels: tp.List[tp.Tuple[float, float, str, str]] = []
    values: tp.List[float] = []
    for quant, rows in by_quant.items():
        color = display(quant).color
        all_pts = []
        for label, marker, series in _series(quant, rows, markers):
            pts = [(r.mean("true_size_mb"), r.mean(key), r.std(key), r) for r in series]
            pts = [p for p in pts if p[0] is not None and p[1] is not None]
            if not pts:
                continue
            all_pts += pts
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts],
                        fmt=marker, color=color, ms=5, capsize=2, label=label)
            for size, metric, _, row in pts:
                text = _point_label(quant, row.axes)
                if text:
                    labels.append((size, metric, text, color))
        values += [p[1] for p in all_pts]
        front = pareto_front([(p[0], p[1]) for p in all_pts], section.lower_is_better)
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=color, lw=1.2, alpha=0.8)
    refs = [r.reference for r in section.rows if r.reference is not None and
            r.reference.value is not None and r.reference.size_mb is not None and
            r.reference.metric == section.metric]
    if refs:
        ax.scatter([r.size_mb for r in refs], [r.value for r in refs], marker="*", s=90,
                   facecolors="none", edgecolors="black", label="paper")
        values += [float(r.value) for r in refs]
    ax.set_xscale("log")
    # plain numbers at 1-2-5 steps instead of crowded 10^k minor labels
    ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.12, y=0.1)  # room for the labels of the outermost points
    finite = [v for v in values if math.isfinite(v)]
    log_metric = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > LOG_RANGE
    if log_metric:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if section.metric in PERCENT_METRICS:
        low, high = ax.get_ylim()
        # room for half a marker above 100 %, never the autoscaled 104 %
        ax.set_ylim(low, min(high, 100.0 + 0.03 * (100.0 - low)))
    ax.set_xlabel("true model size (MiB = 2^20 bytes of quantized.th, log scale)")
    better = "lower" if section.lower_is_better else "higher"
    unit = " (%)" if section.metric in PERCENT_METRICS else ""
    ax.set_ylabel(f"test {section.metric}{unit} ({better} is better{', log scale' if log_metric else ''})")
    ax.set_title(section.title)
    ax.grid(True, which="both", alpha=0.3)
    return labels


#: label offsets tried in turn (points), right of the point first, then left
_OFFSETS = ((4, 3), (4, -9), (4, 10), (4, -16), (-4, 3), (-4, -9), (4, 17), (4, -23))


def _place_labels(ax: tp.Any, labels: tp.Sequence[tp.Tuple[float, float, str, str]]) -> None:
    """Annotate points without overlaps or clipping: each label takes the first offset whose
    box (estimated from its length at 7 pt) stays in the panel and clear of the labels placed
    before it; a label with no free place is left out rather than drawn over another."""
    fig = ax.figure
    scale = fig.dpi / 72.0  # points -> pixels
    box = ax.get_window_extent()
    placed: tp.List[tp.Tuple[float, float, float, float]] = []
    for x, y, text, color in sorted(labels, key=lambda item: (item[0], item[1])):
        px, py = ax.transData.transform((x, y))
        width, height = 4.3 * len(text) * scale, 8.0 * scale
        for dx, dy in _OFFSETS:
            left = px + dx * scale if dx >= 0 else px + dx * scale - width
            bottom = py + dy * scale
            rect = (left, bottom, left + width, bottom + height)
            inside = (rect[0] >= box.x0 and rect[2] <= box.x1 and rect[1] >= box.y0 and rect[3] <= box.y1)
            clear = all(rect[2] <= o[0] or rect[0] >= o[2] or rect[3] <= o[1] or rect[1] >= o[3]
                        for o in placed)
            if inside and clear:
                placed.append(rect)
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                            color=color, ha="left" if dx >= 0 else "right", annotation_clip=True)
                break


def _point_label(quant: str, axes: tp.Mapping[str, tp.Any]) -> str:
    """The method's ``display.point`` annotation of a point (numeric values only)."""
    point = display(quant).point
    if point is None:
        return ""
    value = axes.get(point[0])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    return point[1].format(value)
