"""Failures are truthful: a wrong result never ends DONE, and files stay strict JSON."""
from __future__ import annotations

import json
import math

import pytest

from diffq_bench import cli, io
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
