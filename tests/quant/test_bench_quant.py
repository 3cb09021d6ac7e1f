"""scripts/bench_quant.py --quick: every row of issue 17's table is produced and written (the
figures of a quick run mean nothing; no timing is asserted)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_quant.py"


def _official_installed() -> bool:
    try:
        import diffq  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_quick_bench_writes_every_row(tmp_path):
    out = tmp_path / "quant.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--data",
                           str(tmp_path / "data"), "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| train step, bench LM, over float | 1 |" in done.stdout
    assert "| pack, mixed widths 2-14, Mparam/s | 1 |" in done.stdout
    result = json.loads(out.read_text())
    finite = [result["step_time"]["ratio_median"], result["step_time_embedded_lm"]["ratio_median"],
              result["step_time"]["eval_forward"]["1"]["ratio_median"],
              result["mixed_widths"]["bytes_over_ideal"], result["env"]["load_average_before"][0],
              result["env"]["load_average_after"][0]]
    for rows in ("all_8bit", "mixed_widths"):
        entry = result[rows]["threads"]["1"]
        finite += [entry["pack_mparam_per_s"], entry["unpack_mparam_per_s"]]
    official = _official_installed()
    assert (result["env"]["official_diffq"] is not None) == official
    for key in ("pack_speedup_vs_official", "unpack_speedup_vs_official"):
        value = result["mixed_widths"][key]
        if official:  # measured against it in the same run
            finite.append(value)
        else:  # the official package is optional: the comparison is absent, not invented
            assert value is None
    assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in finite), finite
    assert result["step_time_embedded_lm"]["quantized_tensors"] == 17
    assert result["env"]["threads"] == [1] and result["env"]["quick"] is True
