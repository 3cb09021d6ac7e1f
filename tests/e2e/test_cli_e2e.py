"""End to end: the `diffq-bench` app on the embedded WikiText-format LM at debug size."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from diffq_bench import cli

# Debug size: 2 optimizer steps of a 1-layer d=32 model, cheap evaluation windows. `++` sets a key
# whether or not the task file lists it.
DEBUG = ["train.epochs=1", "train.steps_per_epoch=2", "runtime.progress=false",
         "++task.context_window=0", "++task.eval_tokens_per_sample=256", "++task.eval_batch_size=64",
         "++task.model.d_model=32", "++task.model.ffn_dim=64", "++task.model.n_layers=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One embedded corpus for the whole module (it is written once, then read back)."""
    return tmp_path_factory.mktemp("data")


def _app(monkeypatch, argv):
    monkeypatch.setattr("sys.argv", ["diffq-bench", *argv])
    cli.main()


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "diffq", "qat", "lsq"])
def test_default_debug_run(quant, data_dir, tmp_path, monkeypatch, capsys):
    root = tmp_path / "outputs"
    _app(monkeypatch, [f"quant={quant}", *DEBUG, f"paths.root={root}", f"paths.data={data_dir}",
                       f"paths.cache={data_dir / 'cache'}"])
    out = capsys.readouterr().out
    assert "| test ppl | size (MiB) | compression | bits/weight | wall time (s) |" in out
    (folder,) = list((root / "xps").iterdir())
    result = json.loads((folder / "result.json").read_text())
    m = result["metrics"]
    assert result["task"] == "wikitext_mini" and result["quant"] == quant and result["metric"] == "ppl"
    assert m["test_ppl"] > 1 and m["test_ppl_subset"] == m["test_ppl_subset_restored"]
    assert m["restore_check"] == "subset" and m["restore_exact"] == 1.0
    if quant == "none":
        assert m["bits_per_weight"] == 32 and m["compression"] == 1.0
    else:
        assert m["compression"] > 1.5 and 0 < m["bits_per_weight"] <= 16
    assert json.loads((folder / "status.json").read_text())["state"] == "DONE"


@pytest.mark.slow
def test_console_script_runs_then_skips_finished(data_dir, tmp_path):
    exe = shutil.which("diffq-bench")
    assert exe, "the diffq-bench console script is not installed (pip install -e .)"
    args = [exe, *DEBUG, f"paths.root={tmp_path / 'outputs'}", f"paths.data={data_dir}",
            f"paths.cache={data_dir / 'cache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    first = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "test ppl" in first.stdout
    second = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert second.returncode == 0 and "already finished" in second.stdout
    assert first.stdout.strip().splitlines()[-1] == second.stdout.strip().splitlines()[-1]
    bad = subprocess.run([exe, "lambda=-1", f"paths.root={tmp_path / 'bad'}"], capture_output=True,
                         text=True, timeout=300, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "lambda must be" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_table_console_entry(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "xps" / "abc"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({
        "sig": "abc", "task": "wikitext_mini", "quant": "diffq", "metric": "ppl", "lower_is_better": True,
        "axes": {"lambda": 1.0}, "metrics": {"test_ppl": 150.0, "true_size_mb": 0.5}, "grids": []}))
    monkeypatch.setattr(sys, "argv", ["diffq-bench-table", "--root", str(tmp_path), "--format", "md"])
    cli.table_main()  # the table's layout belongs to diffq_bench.results; the entry point must reach it
    out = capsys.readouterr().out
    assert "wikitext_mini" in out and "150" in out and "|---" in out
