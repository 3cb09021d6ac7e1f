"""Trade-off plots: Pareto fronts, a non-empty PNG per grid, byte-stable output."""
import json

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
