"""Trade-off plots: Pareto fronts, a non-empty PNG per grid, byte-stable output."""
import json
import os
import shutil

import pytest

from diffq_bench.cli import table_main
from diffq_bench.results import plots
from diffq_bench.results.load import load_results
from diffq_bench.results.table import build_sections


def _run(root, sig, quant, value, size, task="lm", metric="ppl", lower=True, **axes):
    folder = root / "xps" / sig
    folder.mkdir(parents=True)
    res = {"sig": sig, "task": task, "quant": quant, "metric": metric, "lower_is_better": lower,
           "axes": {"seed": 0, **axes}, "grids": ["g"],
           "metrics": {f"test_{metric}": value, "true_size_mb": size}}
    (folder / "result.json").write_text(json.dumps(res))


def test_pareto_front_lower_and_higher_is_better():
    pts = [(1.0, 30.0), (2.0, 25.0), (3.0, 27.0), (4.0, 20.0), (4.0, 22.0), (5.0, float("nan"))]
    assert plots.pareto_front(pts, lower_is_better=True) == [(1.0, 30.0), (2.0, 25.0), (4.0, 20.0)]
    acc = [(1.0, 80.0), (2.0, 79.0), (3.0, 85.0), (0.5, 70.0)]
    assert plots.pareto_front(acc, lower_is_better=False) == [(0.5, 70.0), (1.0, 80.0), (3.0, 85.0)]
    assert plots.pareto_front([], True) == []


def test_plot_written_non_empty_and_stable(tmp_path):
    root = tmp_path / "store"
    _run(root, "f", "none", 20.0, 10.0)
    for sig, lam, ppl, size in [("d1", 1.0, 20.5, 1.5), ("d5", 5.0, 21.0, 1.1), ("d10", 10.0, 22.0, 0.9)]:
        _run(root, sig, "diffq", ppl, size, **{"lambda": lam, "group_size": 8})
    _run(root, "q4", "qat", 24.0, 1.3, **{"quant.bits": 4})
    _run(root, "v", "none", 90.0, 1.2, task="digits", metric="top1", lower=False)
    out = tmp_path / "plots" / "g.png"
    table_main(["--root", str(root), "--grid", "g", "--plot", str(out), "-o", str(tmp_path / "t.md")])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    sections = build_sections(load_results(root))
    plots.plot_sections(sections, out, title="grid g")
    assert out.read_bytes() == data
    assert not list(out.parent.glob(".*.tmp"))


def test_plot_without_sizes_is_an_error(tmp_path):
    folder = tmp_path / "xps" / "x"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(
        {"sig": "x", "task": "lm", "quant": "none", "metric": "ppl", "axes": {}, "metrics": {"test_ppl": 3.0}}))
    with pytest.raises(ValueError, match="nothing to plot"):
        plots.plot_sections(build_sections(load_results(tmp_path)), tmp_path / "p.png")


def _issue_store(root):
    """The figure of the issue: an LM panel with DiffQ at g=0 and g=16 and a diverged debug run
    (PPL 80,000), a second LM task with g=16 only, crowded λ labels, and an accuracy panel at 100%."""
    _run(root, "f", "none", 240.0, 0.85)
    for sig, lam, g, ppl, size in [("a1", 1.0, 0, 241.0, 0.47), ("a5", 5.0, 0, 243.0, 0.46),
                                   ("a25", 25.0, 0, 246.0, 0.45), ("b1", 1.0, 16, 241.5, 0.48),
                                   ("b5", 5.0, 16, 242.5, 0.47), ("b25", 25.0, 16, 245.0, 0.44)]:
        _run(root, sig, "diffq", ppl, size, **{"lambda": lam, "group_size": g})
    _run(root, "dbg", "diffq", 80_000.0, 0.86, **{"lambda": 1.0, "group_size": 16, "train.epochs": 1})
    for sig, lam, ppl, size in [("c1", 1.0, 30.0, 2.0), ("c10", 10.0, 32.0, 1.0)]:
        _run(root, sig, "diffq", ppl, size, task="lm2", **{"lambda": lam, "group_size": 16})
    _run(root, "v0", "none", 100.0, 1.2, task="digits", metric="top1", lower=False)
    _run(root, "v1", "qat", 99.5, 0.3, task="digits", metric="top1", lower=False, **{"quant.bits": 4})
    _run(root, "v1b", "qat", 97.5, 0.3, task="digits", metric="top1", lower=False,
         **{"quant.bits": 4, "seed": 1})


def test_plot_styles_scales_and_labels(tmp_path):
    import matplotlib.pyplot as plt

    root = tmp_path / "store"
    _issue_store(root)
    fig = plots.build_figure(build_sections(load_results(root)), title="g")
    try:
        (legend,) = fig.legends
        names = [t.get_text() for t in legend.get_texts()]
        drawn = [(c.get_label(), c.lines[0].get_marker()) for ax in fig.axes for c in ax.containers]
        styles = dict(drawn)
        assert len(set(drawn)) == len(styles), f"one legend name, two styles: {drawn}"
        assert set(styles) <= set(names)
        # every DiffQ series is named by its group size, each with its own marker
        assert "DiffQ" not in styles and {"DiffQ g=0", "DiffQ g=16"} <= set(styles)
        assert styles["DiffQ g=0"] != styles["DiffQ g=16"]
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
        # the g=16-only panel draws g=16 with the legend's g=16 marker
        assert [(c.get_label(), c.lines[0].get_marker()) for c in panels["lm2"].containers] == [
            ("DiffQ g=16", styles["DiffQ g=16"])]
        # the diverged run does not squash the others: the metric axis is logarithmic
        assert panels["lm"].get_yscale() == "log" and panels["lm2"].get_yscale() == "linear"
        # accuracy stops at 100 %
        low, high = panels["digits"].get_ylim()
        assert 100.0 <= high <= 100.0 + 0.03 * (100.0 - low)
        # λ labels: none overlap, none leaves its panel, none is dropped on this figure
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for name, ax in panels.items():
            boxes = [t.get_window_extent(renderer) for t in ax.texts]
            frame = ax.get_window_extent(renderer)
            for i, box in enumerate(boxes):
                assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, name
                assert not any(box.overlaps(other) for other in boxes[i + 1:]), name
        assert len(panels["lm"].texts) == 7 and len(panels["lm2"].texts) == 2
    finally:
        plt.close(fig)
    out = plots.plot_sections(build_sections(load_results(root)), tmp_path / "issue.png", title="g")
    if os.environ.get("DIFFQ_BENCH_KEEP_PLOT"):  # to look at it
        shutil.copy(out, os.environ["DIFFQ_BENCH_KEEP_PLOT"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
