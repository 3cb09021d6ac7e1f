"""Run identity, run folder files, locking, and the results table."""
from __future__ import annotations

import csv
import io
import json

import pytest

from diffq_bench.cli import table_main
from diffq_bench.results.load import load_results
from diffq_bench.results.render import render
from diffq_bench.results.table import build_table
from diffq_bench.xp import RunLockedError, Xp, axes, signature

BASE = {"task": {"name": "toy", "hidden": 128}, "quant": {"name": "diffq", "penalty": 1, "group_size": 16},
        "optim": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999]}, "train": {"epochs": 10},
        "seed": 0, "lambda": 1, "group_size": 16,
        "paths": {"root": "outputs", "data": "data"}, "device": "auto", "num_workers": 0,
        "runtime": {"progress": True}}


def _with(**changes):
    cfg = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return cfg


def test_int_and_float_are_the_same_run():
    assert signature(_with(train__epochs=10)) == signature(_with(train__epochs=10.0))
    assert signature(_with(quant__penalty=1)) == signature(_with(quant__penalty=1.0))


def test_key_order_is_irrelevant():
    reordered = {k: BASE[k] for k in reversed(list(BASE))}
    reordered["task"] = {"hidden": 128, "name": "toy"}
    assert signature(reordered) == signature(BASE)


@pytest.mark.parametrize("key, value", [("paths__root", "/elsewhere"), ("paths__data", "x"),
                                        ("num_workers", 8), ("device", "cuda"),
                                        ("runtime__progress", False)])
def test_non_semantic_keys_are_excluded(key, value):
    assert signature(_with(**{key: value})) == signature(BASE)


@pytest.mark.parametrize("key, value", [("seed", 1), ("optim__lr", 2e-3), ("train__epochs", 11),
                                        ("quant__penalty", 5), ("task__hidden", 64),
                                        ("optim__betas", [0.9, 0.99]), ("quant__name", "qat")])
def test_semantic_keys_change_the_run(key, value):
    assert signature(_with(**{key: value})) != signature(BASE)


def test_bool_and_string_are_not_numbers():
    assert signature(_with(train__epochs=True)) != signature(_with(train__epochs=1))
    assert signature(_with(train__epochs="10")) != signature(BASE)


def test_aliases_are_hashed_through_the_quantizer_only():
    # lambda only matters via quant.penalty (the interpolation target)
    assert signature(_with(**{"lambda": 7})) == signature(BASE)
    ax = axes(BASE)
    assert ax["lambda"] == 1 and ax["group_size"] == 16 and ax["quant.penalty"] == 1
    assert "paths.root" not in ax and ax["optim.betas"] == "[0.9, 0.999]"


def test_folder_status_lock(tmp_path):
    xp = Xp(tmp_path, BASE)
    assert xp.folder == tmp_path / "xps" / xp.sig
    xp.create()
    assert "name: toy" in xp.config_path.read_text() and "paths" not in xp.config_path.read_text()
    xp.lock()
    other = Xp(tmp_path, _with(train__epochs=10.0))
    with pytest.raises(RunLockedError, match="already running"):
        other.lock()
    status = xp.start_attempt(grids=["g1"])
    assert status["state"] == "RUNNING" and status["attempt"] == 1 and status["grids"] == ["g1"]
    status = xp.start_attempt(grids=["g2"])
    assert status["attempt"] == 2 and status["grids"] == ["g1", "g2"]
    xp.write_status("FAILED", traceback="Traceback...")
    loaded = xp.read_status()
    for key in ("state", "attempt", "requeues", "host", "pid", "job_id", "started", "updated",
                "epoch", "traceback", "grids"):
        assert key in loaded
    with pytest.raises(ValueError, match="state must be one of"):
        xp.write_status("WEIRD")
    xp.unlock()
    other.lock()  # free again
    other.unlock()
    assert not xp.is_done()


def _fake_result(root, sig, task, quant, lam, ppl, grids=()):
    folder = root / "xps" / sig
    folder.mkdir(parents=True)
    res = {"sig": sig, "task": task, "quant": quant, "metric": "ppl", "lower_is_better": True,
           "axes": {"lambda": lam, "seed": 0, "quant.name": quant, "task.name": task},
           "metrics": {"test_ppl": ppl, "true_size_mb": 1.5, "compression": 8.0,
                       "bits_per_weight": 4.0, "wall_time_s": 12.0, "params": 100},
           "grids": list(grids), "finished": "2026-01-01T00:00:00+00:00"}
    (folder / "result.json").write_text(json.dumps(res))


def test_results_table_formats_and_filters(tmp_path):
    _fake_result(tmp_path, "a1", "lm", "diffq", 1.0, 20.5, grids=["table_lm"])
    _fake_result(tmp_path, "a2", "lm", "diffq", 10.0, 23.25, grids=["table_lm"])
    _fake_result(tmp_path, "b1", "lm", "none", 1.0, 19.0)
    (tmp_path / "xps" / "broken").mkdir()
    (tmp_path / "xps" / "broken" / "result.json").write_text("{not json")
    rows = load_results(tmp_path)
    assert len(rows) == 3
    header, table = build_table(load_results(tmp_path, quant="diffq"))
    assert header[:5] == ["sig", "task", "quant", "lambda", "test_ppl"]  # only varying axes
    assert "seed" not in header and [r[3] for r in table] == [1.0, 10.0]
    assert len(load_results(tmp_path, grid="table_lm")) == 2
    assert load_results(tmp_path, task="cifar") == []
    md = render(header, table, "md")
    assert md.splitlines()[0].startswith("| sig | task | quant | lambda | test_ppl") and "23.25" in md
    parsed = list(csv.reader(io.StringIO(render(header, table, "csv"))))
    assert parsed[0] == header and parsed[2][header.index("test_ppl")] == "23.25"
    latex = render(header, table, "latex")
    assert "\\begin{tabular}" in latex and "test\\_ppl" in latex and latex.count("\\\\") == 3
    with pytest.raises(ValueError, match="unknown format"):
        render(header, table, "html")


def test_table_cli(tmp_path, capsys):
    _fake_result(tmp_path, "a1", "lm", "diffq", 1.0, 20.5)
    table_main(["--root", str(tmp_path), "--format", "csv"])
    assert "a1,lm,diffq" in capsys.readouterr().out
    out = tmp_path / "t.tex"
    table_main(["--root", str(tmp_path), "--format", "latex", "-o", str(out)])
    assert "tabular" in out.read_text()
    with pytest.raises(SystemExit):
        table_main(["--root", str(tmp_path), "--task", "nothing"])
