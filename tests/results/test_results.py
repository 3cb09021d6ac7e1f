"""Paper tables from a synthetic run store: grouping over seeds, ordering, references, formats."""
import csv
import io
import json

import pytest

from diffq_bench.cli import table_main
from diffq_bench.results.load import DEFAULT_REFERENCE_DIR, load_references, load_results
from diffq_bench.results.render import FORMATS, MISSING, render_sections, section_table, trade_off_notes
from diffq_bench.results.table import build_sections


def write_run(root, sig, quant, metric_value, size, task="wikitext103", seed=0, grids=("table_lm",),
              metric="ppl", lower=True, **axes):
    folder = root / "xps" / sig
    folder.mkdir(parents=True)
    ax = {"task.name": task, "quant.name": quant, "seed": seed, "optim.lr": 1.0, **axes}
    res = {"sig": sig, "task": task, "quant": quant, "metric": metric, "lower_is_better": lower,
           "axes": ax, "metrics": {f"test_{metric}": metric_value, "true_size_mb": size,
                                   "compression": 100.0 / size,
                                   "bits_per_weight": 0.0 if quant == "none" else 32 * size / 100,
                                   "wall_time_s": 1.0},
           "grids": list(grids), "finished": "2026-01-01T00:00:00+00:00"}
    (folder / "result.json").write_text(json.dumps(res))
    (folder / "status.json").write_text(json.dumps({"state": "DONE", "grids": list(grids)}))


REFS = """\
references:
  - {task: wikitext103, quant: diffq, match: {lambda: 1, group_size: 16}, metric: ppl, value: 18.0,
     source: "DiffQ paper", provenance: seed}
  - {task: wikitext103, quant: lsq, match: {quant.bits: 4}, metric: ppl, value: 19.5, size_mb: 120.0,
     source: "made-up test source", provenance: test}
  - {task: wikitext103, quant: dsq, metric: ppl, value: 30.0, source: "other", provenance: test,
     matchable: false, note: "bits not stated"}
  - {task: cifar10, quant: none, metric: top1, value: 95.0, source: "not in the store", provenance: test}
"""


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    write_run(root, "f0", "none", 18.5, 100.0)
    write_run(root, "q8", "qat", 18.9, 25.0, **{"quant.bits": 8})
    write_run(root, "q4", "qat", 21.0, 12.5, **{"quant.bits": 4})
    # DiffQ lambda=1 g=16 over two seeds; lambda=10 with one; lambda=1 g=8 one
    write_run(root, "d1s0", "diffq", 18.0, 14.0, seed=0, **{"lambda": 1.0, "group_size": 16,
                                                             "quant.penalty": 1.0, "quant.seed": 0})
    write_run(root, "d1s1", "diffq", 18.4, 14.4, seed=1, **{"lambda": 1, "group_size": 16,
                                                             "quant.penalty": 1, "quant.seed": 1})
    write_run(root, "d10", "diffq", 19.0, 10.0, **{"lambda": 10.0, "group_size": 16,
                                                   "quant.penalty": 10.0})
    write_run(root, "d1g8", "diffq", 18.2, 15.0, **{"lambda": 1.0, "group_size": 8,
                                                    "quant.penalty": 1.0})
    write_run(root, "other", "none", 50.0, 1.0, task="wikitext_mini", grids=())
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "paper.yaml").write_text(REFS)
    return root, refs


def test_rows_grouped_ordered_and_referenced(store):
    root, refs = store
    runs = load_results(root, grid="table_lm")
    assert {r["sig"] for r in runs} == {"f0", "q8", "q4", "d1s0", "d1s1", "d10", "d1g8"}
    (section,) = build_sections(runs, load_references(refs))
    labels = [r.label for r in section.rows]
    assert labels == ["Float", "QAT 4 bits", "QAT 8 bits", "LSQ 4 bits",
                      "DiffQ (λ=1, g=8)", "DiffQ (λ=1, g=16)", "DiffQ (λ=10, g=16)"]
    assert section.extra_axes == []  # seed and quant.seed are averaged, lambda/bits are in labels
    header, cells = section_table(section, "md")
    row = dict(zip(header, cells[labels.index("DiffQ (λ=1, g=16)")]))
    assert row["ppl ↓"] == "18.20 ± 0.28" and row["seeds"] == "2"
    assert row["paper ppl"] == "18.0" and row["Δ"] == "+0.20" and row["paper MB"] == MISSING
    lsq = dict(zip(header, cells[labels.index("LSQ 4 bits")]))  # published, not run by us
    assert lsq["ppl ↓"] == MISSING and lsq["paper ppl"] == "19.5" and lsq["paper MB"] == "120.0"
    qat = dict(zip(header, cells[labels.index("QAT 4 bits")]))
    assert qat["paper ppl"] == MISSING and qat["Δ"] == MISSING
    assert qat["size MiB"] == "12.5" and qat["compr."] == "8.0×" and qat["seeds"] == "1"
    assert qat["bits/w"] == "4.00"
    float_row = dict(zip(header, cells[labels.index("Float")]))
    assert float_row["bits/w"] == MISSING  # nothing quantized: no bit width, not "0.00"
    assert section.notes and "bits not stated" in section.notes[0]


def test_markdown_latex_csv_byte_stable(store, tmp_path):
    root, refs = store
    outs = {}
    for fmt in FORMATS:
        out = tmp_path / f"t.{fmt}"
        table_main(["--root", str(root), "--grid", "table_lm", "--format", fmt,
                      "--reference", str(refs), "-o", str(out)])
        outs[fmt] = out.read_bytes()
        table_main(["--root", str(root), "--grid", "table_lm", "--format", fmt,
                      "--reference", str(refs), "-o", str(out)])
        assert out.read_bytes() == outs[fmt], fmt
    md = outs["md"].decode()
    assert md.startswith("# grid table_lm\n\n## wikitext103\n") and "Source: DiffQ paper" in md
    assert "Not matched to a row: DSQ: ppl 30.0; bits not stated (other; test)" in md and "cifar10" not in md
    latex = outs["latex"].decode()
    assert "DiffQ ($\\lambda$=1, g=16)" in latex and "18.20 $\\pm$ 0.28" in latex
    assert "\\begin{tabular}{lrrrrrrrrr}" in latex
    parsed = list(csv.DictReader(io.StringIO(outs["csv"].decode())))
    assert len(parsed) == 7
    diffq = [p for p in parsed if p["method"] == "DiffQ (λ=1, g=16)"][0]
    assert diffq["runs"] == "d1s0 d1s1" and float(diffq["ppl_mean"]) == pytest.approx(18.2)
    assert float(diffq["ppl_std"]) == pytest.approx(0.28284271, rel=1e-6)
    assert float(diffq["delta_ppl"]) == pytest.approx(0.2) and diffq["paper_source"] == "DiffQ paper"
    assert [p for p in parsed if p["method"] == "LSQ 4 bits"][0]["runs"] == ""


def test_input_order_does_not_change_output(store):
    root, refs = store
    runs = load_results(root, grid="table_lm")
    ref = load_references(refs)
    a = render_sections(build_sections(runs, ref), "md")
    b = render_sections(build_sections(list(reversed(runs)), ref), "md")
    assert a == b


def test_sections_per_task_and_model_with_varying_axes(tmp_path):
    root = tmp_path
    for sig, model, quant, acc, size, epochs in [("a", "resnet18", "none", 95.0, 42.6, 200),
                                                 ("b", "resnet18", "none", 94.0, 42.6, 100),
                                                 ("c", "mobilenet", "qat", 90.0, 1.6, 200)]:
        write_run(root, sig, quant, acc, size, task="cifar10", metric="top1", lower=False,
                  grids=("table_cifar10",), **{"task.model": model, "train.epochs": epochs,
                                               **({"quant.bits": 4} if quant == "qat" else {})})
    sections = build_sections(load_results(root))
    assert [s.title for s in sections] == ["cifar10 (mobilenet)", "cifar10 (resnet18)"]
    assert sections[1].extra_axes == ["train.epochs"]
    header, cells = section_table(sections[1], "md")
    assert header[:3] == ["Method", "train.epochs", "top1 ↑"]
    assert [c[1] for c in cells] == ["100", "200"]  # numeric order of the varying axis


def test_axis_a_method_leaves_unset_is_a_dash_not_none(tmp_path):
    write_run(tmp_path, "a", "none", 95.0, 4.0, task="digits", metric="top1", lower=False,
              **{"optim.quant_lr": None})
    write_run(tmp_path, "b", "diffq", 94.0, 0.5, task="digits", metric="top1", lower=False,
              **{"optim.quant_lr": 0.05, "lambda": 1, "group_size": 8})
    (section,) = build_sections(load_results(tmp_path))
    assert section.extra_axes == ["optim.quant_lr"]
    _, cells = section_table(section, "md")
    assert [c[1] for c in cells] == [MISSING, "0.05"]
    header, rows = section_table(section, "csv")
    assert [r[header.index("optim.quant_lr")] for r in rows] == ["", "0.05"]


def test_missing_reference_is_missing_not_invented(store):
    root, _ = store
    out = render_sections(build_sections(load_results(root, grid="table_lm")), "md")
    lines = [line for line in out.splitlines() if line.startswith("| ") and "Method" not in line]
    assert len(lines) == 6 and all(line.rstrip(" |").endswith(MISSING) for line in lines)


def test_bad_inputs(tmp_path, store):
    root, _ = store
    bad = tmp_path / "badrefs"
    bad.mkdir()
    (bad / "x.yaml").write_text("references:\n  - {task: a, quant: b, metric: ppl, valu: 1}\n")
    with pytest.raises(ValueError, match=r"x.yaml entry #0.*valu.*source"):
        load_references(bad)
    with pytest.raises(ValueError, match="unknown format"):
        render_sections([], "html")
    with pytest.raises(SystemExit):
        table_main(["--root", str(root), "--grid", "no_such_grid"])
    assert load_references(tmp_path / "absent") == []


def test_per_run_table_keeps_raw_rows(store, capsys):
    root, _ = store
    table_main(["--root", str(root), "--grid", "table_lm", "--per-run", "--format", "csv"])
    parsed = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert parsed[0][:3] == ["sig", "task", "quant"] and len(parsed) == 8


def test_committed_references_load_and_cite_sources():
    refs = load_references(DEFAULT_REFERENCE_DIR)
    assert refs, "results/reference/*.yaml should hold the published numbers"
    for ref in refs:
        assert ref.source.strip() and ref.provenance.strip()
        assert ref.value is not None or ref.note, f"{ref}: a claim without a value needs a note"


def test_trade_off_notes_report_what_was_measured(store):
    root, _ = store
    (section,) = build_sections(load_results(root, grid="table_lm"))
    notes = trade_off_notes(section)
    # g=16: lambda 1 -> 14.2 MiB, 10 -> 10.0 MiB; g=8 has a single lambda (no claim)
    assert notes[0] == ("DiffQ g=16: size decreases strictly as λ grows "
                        "(λ=1: 14.2 MiB, λ=10: 10.0 MiB).")
    assert "QAT 4 bits (12.5 MiB, ppl 21.00): best DiffQ at ≤ this size is DiffQ (λ=10, g=16) " \
           "(10.0 MiB, ppl 19.00): DiffQ better." in notes
    # a tie (18.2 for g=8 and g=16) goes to the first row in table order
    assert "QAT 8 bits (25.0 MiB, ppl 18.90): best DiffQ at ≤ this size is DiffQ (λ=1, g=8) " \
           "(15.0 MiB, ppl 18.20): DiffQ better." in notes
    write_run(root, "d20", "diffq", 25.0, 11.0, **{"lambda": 20.0, "group_size": 16})
    (section,) = build_sections(load_results(root, grid="table_lm"))
    assert "does NOT decrease monotonically" in trade_off_notes(section)[0]


def test_trade_off_notes_compare_only_runs_that_differ_in_lambda_alone(tmp_path):
    # three lambda=1 runs that differ in another setting (epochs, bits lr) and one lambda=5 run:
    # no lambda path exists (each pair differs in something else), so no size claim is printed
    root = tmp_path / "store"
    for sig, size, extra in (("a", 0.8, {"train.epochs": 2}), ("b", 0.5, {"train.epochs": 4}),
                             ("c", 0.9, {"train.epochs": 2, "optim.quant_lr": 0.05})):
        write_run(root, sig, "diffq", 240.0, size, task="wikitext_mini", grids=("g",),
                  **{"lambda": 1.0, "group_size": 16, **extra})
    write_run(root, "d", "diffq", 245.0, 0.6, task="wikitext_mini", grids=("g",),
              **{"lambda": 5.0, "group_size": 16, "train.epochs": 4, "optim.quant_lr": 0.05})
    write_run(root, "q", "qat", 250.0, 0.7, task="wikitext_mini", grids=("g",),
              **{"quant.bits": 4, "train.epochs": 8})
    (section,) = build_sections(load_results(root, grid="g"))
    assert trade_off_notes(section) == []  # nothing comparable: no claim at all
    # a comparable pair (same epochs and bits lr, lambda 1 vs 5): exactly one path, naming its settings
    write_run(root, "e", "diffq", 241.0, 0.95, task="wikitext_mini", grids=("g",),
              **{"lambda": 1.0, "group_size": 16, "train.epochs": 4, "optim.quant_lr": 0.05})
    (section,) = build_sections(load_results(root, grid="g"))
    assert trade_off_notes(section) == [
        "DiffQ g=16, optim.quant_lr=0.05, train.epochs=4: size decreases strictly as λ grows "
        "(λ=1: 0.95 MiB, λ=5: 0.6 MiB)."]


def test_published_numbers_state_their_provenance():
    refs = load_references(DEFAULT_REFERENCE_DIR)
    assert {r.provenance for r in refs} <= {"papers-with-code", "abstract", "readme", "seed", "derived"}
    pwc = {(r.task, r.metric): r.value for r in refs if r.provenance == "papers-with-code"}
    assert pwc == {("wikitext103", "ppl"): 18, ("imagenet", "top1"): 82}  # integers, as printed there
    assert all("REFERENCE.md" not in r.source for r in refs)  # not a file of this repository
    demucs = {(r.quant, r.metric): (r.value, r.size_mb) for r in refs if r.task == "musdb_demucs"}
    assert demucs[("none", "sdr")] == (6.3, None) and demucs[("diffq", "sdr")] == (None, 150.0)


def test_rows_tested_on_a_subset_are_marked(tmp_path):
    """Rows evaluated on the first N items (task.eval_subset > 0, e.g. +preset=debug) carry a † and
    a note; full-test rows do not (found by the first-hour walkthrough: debug rows looked real)."""
    root = tmp_path / "store"
    write_run(root, "full", "none", 18.5, 100.0, **{"task.eval_subset": 0})
    write_run(root, "dbg", "qat", 40.0, 12.5, **{"quant.bits": 4, "task.eval_subset": 4})
    (section,) = build_sections(load_results(root))
    labels = {row.runs[0]["sig"]: row.label for row in section.rows}
    assert labels == {"full": "Float", "dbg": "QAT 4 bits †"}
    assert any(n.startswith("† tested on the first 4 evaluation items only") for n in section.notes)
    write_run(root, "full8", "qat", 19.0, 25.0, **{"quant.bits": 8})
    (section,) = build_sections([r for r in load_results(root) if r["sig"] != "dbg"])
    assert not any("†" in row.label for row in section.rows) and not any("†" in n for n in section.notes)
