"""Failures are truthful: a wrong result never ends DONE, and files stay strict JSON."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from diffq_bench import cli, io
from diffq_bench.data import fingerprint
from diffq_bench.data.errors import DataChangedError
from diffq_bench.xp import Xp


def test_nan_last_step_ends_failed_not_done(compose_toy):
    """One diverging optimizer step, the last one: before, the run ended DONE with NaN metrics."""
    cfg = compose_toy("optim=sgd", "optim.lr=1e30", "train.epochs=1", "train.steps_per_epoch=1")
    with pytest.raises(FloatingPointError, match="non-finite weights .* after epoch 1: the run diverged"):
        cli.run(cfg)
    xp = Xp(cfg.paths.root, cfg)
    status = json.loads(xp.status_path.read_text())
    assert status["state"] == "FAILED" and "FloatingPointError" in status["traceback"]
    assert not xp.result_path.exists()


def test_json_files_stay_strict(tmp_path):
    with pytest.raises(ValueError, match=r"refusing to write .*result\.json: a value is NaN"):
        io.write_json(tmp_path / "result.json", {"metrics": {"test_ppl": math.nan}})
    assert not (tmp_path / "result.json").exists()
    with pytest.raises(ValueError, match="NaN or infinite"):
        io.write_lines(tmp_path / "history.jsonl", [{"loss": math.inf}])


@pytest.mark.parametrize("override", ["lambda=inf", "lambda=1e400", "optim.lr=inf", "optim.weight_decay=inf",
                                      "optim.quant_lr=inf", "quant.min_size=inf"])
def test_non_finite_values_are_refused_at_config_time(compose_toy, override):
    from diffq_bench.config import ConfigError, validate
    with pytest.raises(ConfigError, match="must be a finite number"):
        validate(compose_toy("quant=diffq", override))


# ------------------------------------------------------------------ the data a run was trained on
def _toy_with_data(monkeypatch, toy_task, folder):
    original = toy_task.setup

    def setup(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.data_dir = folder
    monkeypatch.setattr(toy_task, "setup", setup)


def test_changed_data_refuses_to_report_or_resume(compose_toy, toy_task, monkeypatch, tmp_path):
    """Before, a finished run was reported again after its dataset was replaced: a number for
    data it never saw. Now data.json is compared first, and the run folder is left untouched."""
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "a.bin").write_bytes(b"1234")
    (data / "test.bin").write_bytes(b"abcd")
    _toy_with_data(monkeypatch, toy_task, data)
    cfg = compose_toy("train.epochs=1")
    cli.run(cfg)
    xp = Xp(cfg.paths.root, cfg)
    recorded = json.loads(xp.data_path.read_text())
    assert set(recorded["groups"]) == {"train", "test.bin"}
    assert cli.run(cfg)["sig"] == xp.sig  # same data: reported again
    (data / "train" / "a.bin").write_bytes(b"12345")
    before = {p.name: p.stat().st_mtime_ns for p in xp.folder.iterdir()}
    with pytest.raises(DataChangedError, match=r"train changed \(1 -> 1 files, 4 -> 5 bytes\)"):
        cli.run(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in xp.folder.iterdir()} == before


def test_fingerprint_sees_content_and_skips_rereading_unchanged_files(tmp_path, monkeypatch):
    root = tmp_path / "d"
    (root / "x").mkdir(parents=True)
    (root / "x" / "f").write_bytes(b"a" * 10)
    files = lambda: [p for p in root.rglob("*") if p.is_file()]  # noqa: E731
    first = fingerprint.fingerprint(root, files(), tmp_path / "cache")
    reads = []
    real = fingerprint._digest
    monkeypatch.setattr(fingerprint, "_digest", lambda p, s: reads.append(p) or real(p, s))
    assert fingerprint.fingerprint(root, files(), tmp_path / "cache") == first and reads == []
    (root / "x" / "f").write_bytes(b"b" * 10)  # same size, other content
    second = fingerprint.fingerprint(root, files(), tmp_path / "cache")
    assert "x changed" in fingerprint.differences(first, second)
    monkeypatch.setattr(fingerprint, "MAX_CONTENT_FILES", 0)  # ImageNet-sized: names and sizes
    cheap = fingerprint.fingerprint(root, files(), tmp_path / "cache")
    assert cheap["content"] == "names and sizes" and fingerprint.differences(cheap, cheap) == ""


# ------------------------------------------------------------------ signals and exit codes
SIGNAL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import conftest
    from diffq_bench.tasks import TASKS
    from diffq_bench import cli
    from diffq_bench.config import compose
    TASKS["toy"] = conftest.ToyTask
    cfg = compose(["hydra.searchpath=[file://{conf}]", "task=toy", "quant=diffq", "paths.root={root}",
                   "runtime.progress=false"])
    cli.INTERRUPT.install()
    try:
        cli._hydra_task(cfg)
    except SystemExit as exc:
        print("EXIT", exc.code)
""")


@pytest.mark.slow
def test_ctrl_c_checkpoints_marks_interrupted_and_resumes_exactly(compose_toy, toy_conf, tmp_path):
    """Before, Ctrl-C killed the run mid-step with a traceback and left it RUNNING."""
    script = SIGNAL_SCRIPT.format(tests=str(Path(__file__).parents[1]), conf=toy_conf, root=tmp_path / "int")
    reference = cli.run(compose_toy("quant=diffq", f"paths.root={tmp_path / 'ref'}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env={**env, "TOY_TASK_DELAY": "0.05"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "int" / "xps" / reference["sig"]
    deadline = time.time() + 60
    while time.time() < deadline and not (folder / "history.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert f"EXIT {cli.EXIT_INTERRUPTED}" in out, err
    assert "checkpointing at the next step" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "INTERRUPTED" and (folder / "checkpoint.th").exists()
    again = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "EXIT" not in again.stdout, again.stderr
    result = json.loads((folder / "result.json").read_text())
    assert result["metrics"]["test_acc"] == reference["metrics"]["test_acc"]
    assert json.loads((folder / "status.json").read_text())["attempt"] == 2


def test_result_json_of_another_program_is_a_load_error(compose_toy):
    cfg = compose_toy("train.epochs=1")
    cli.run(cfg)
    xp = Xp(cfg.paths.root, cfg)
    xp.result_path.write_text('{"accuracy": 0.9}')
    with pytest.raises(io.LoadError, match="is not a diffq-bench result"):
        xp.read_result()
