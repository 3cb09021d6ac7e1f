"""diffq-bench-status: rows built from run folders and scheduler states (no cluster needed)."""
import datetime
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from diffq_bench.cli import status_main
from diffq_bench.launch import status
from diffq_bench.tasks import Task
from diffq_bench.xp import Xp


@pytest.mark.parametrize("seconds,text", [(None, "-"), (0, "0s"), (59.9, "59s"), (61, "1m"),
                                          (7200, "2h"), (3 * 86400 + 5, "3d"), (-3, "0s")])
def test_format_age(seconds, text):
    assert status.format_age(seconds) == text


def _run(root, seed, state=None, **fields):
    cfg = OmegaConf.create({"paths": {"root": str(root)}, "task": {"name": "toy"},
                            "quant": {"name": "none"}, "seed": seed, "train": {"epochs": 4}})
    xp = Xp(root, cfg)
    xp.create()
    if state:
        xp.write_status(state, **fields)
    return xp


def test_rows_combine_run_store_and_scheduler(tmp_path):
    done = _run(tmp_path, 0, "DONE", epoch=4, attempt=1, job_id="5_0")
    done.write_result({"sig": done.sig, "task": "toy", "quant": "none", "metric": "acc",
                       "metrics": {"test_acc": 0.8125},
                       "axes": {"task.name": "toy", "seed": 0, "train.epochs": 4}})
    running = _run(tmp_path, 1, "RUNNING", epoch=2, attempt=2, requeues=1, job_id="5_1")
    running.write_history([{"epoch": 1, "valid": {"acc": 0.5}}, {"epoch": 2, "valid": {"acc": 0.75}}])
    running.log("epoch 2 done")
    stale = _run(tmp_path, 2, "RUNNING", job_id="5_2")
    queued = _run(tmp_path, 3)  # folder made by the launcher, job not started yet
    Xp.at(queued.folder).record_submission("6_0")
    resubmitted = _run(tmp_path, 4, "FAILED", job_id="5_4")
    old = json.loads(resubmitted.status_path.read_text())
    resubmitted.status_path.write_text(json.dumps({**old, "updated": "2000-01-01T00:00:00+00:00"}))
    Xp.at(resubmitted.folder).record_submission("6_1")
    ending = _run(tmp_path, 5)  # failed just now: its job is still tearing down
    Xp.at(ending.folder).record_submission("6_2")
    ending.write_status("FAILED", traceback="boom")
    states = {"5_0": "COMPLETED", "5_1": "RUNNING", "5_2": "CANCELLED", "6_0": "PENDING",
              "6_1": "RUNNING", "6_2": "RUNNING"}
    rows = {r["sig"]: r for r in (status.run_row(x.folder, states) for x in
                                  (done, running, stale, queued, resubmitted, ending))}
    assert rows[done.sig]["state"] == "DONE" and rows[done.sig]["best"] == "test_acc=0.8125"
    assert rows[done.sig]["run"] == "task.name=toy seed=0" and rows[done.sig]["epoch"] == "4/4"
    row = rows[running.sig]
    assert (row["state"], row["slurm"], row["job"], row["attempt"], row["requeues"], row["epoch"]) == \
        ("RUNNING", "RUNNING", "5_1", "2", "1", "2/4")
    assert row["log age"].endswith("s")
    assert rows[stale.sig]["state"] == "STALE" and rows[stale.sig]["slurm"] == "CANCELLED"
    assert rows[queued.sig]["state"] == "QUEUED" and rows[queued.sig]["job"] == "6_0"
    assert rows[resubmitted.sig]["state"] == "RUNNING" and rows[resubmitted.sig]["job"] == "6_1"
    assert rows[ending.sig]["state"] == "FAILED" and rows[ending.sig]["slurm"] == "RUNNING"
    table = status.render(list(rows.values()))
    assert table.splitlines()[0].split()[:3] == ["sig", "state", "slurm"]
    assert table.splitlines()[-1] == "6 runs: 1 DONE, 1 FAILED, 1 QUEUED, 2 RUNNING, 1 STALE"


def test_best_metric_uses_history_direction(tmp_path, monkeypatch):
    xp = _run(tmp_path, 0, "RUNNING")
    xp.write_history([{"epoch": 1, "valid": {"ppl": 30.0}}, {"epoch": 2, "valid": {"ppl": 20.0}},
                      {"epoch": 3, "valid": {"ppl": 25.0}}])
    monkeypatch.setattr(status, "task_of", lambda xp: type("PplTask", (Task,), {"metric": "ppl"}))
    assert status.best_metric(xp.folder) == "valid_ppl=20@e2"
    monkeypatch.setattr(status, "task_of", lambda xp: type("Higher", (Task,), {"metric": "ppl",
                                                                             "lower_is_better": False}))
    assert status.best_metric(xp.folder) == "valid_ppl=30@e1"


def test_last_log_age_reads_the_timestamp(tmp_path):
    (tmp_path / "log.txt").write_text("2026-01-01T00:00:00+00:00 started\n2026-01-01T00:01:40+00:00 epoch 1\n")
    stamp = 1767225700.0  # 2026-01-01T00:01:40Z
    assert Xp.at(tmp_path).log_age(now=stamp + 30) == pytest.approx(30)
    assert Xp.at(tmp_path / "missing").log_age() is None


def test_main_prints_table_and_json(tmp_path, capsys):
    _run(tmp_path, 0, "FAILED", traceback="boom")
    status_main(["--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "FAILED" in out and out.strip().endswith("1 runs: 1 FAILED")
    status_main(["--root", str(tmp_path), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["state"] == "FAILED"
    with pytest.raises(SystemExit):
        status_main(["--root", str(tmp_path / "nowhere")])
    assert "no run store" in capsys.readouterr().err


def test_unknown_grid_lists_the_available_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        status_main(["--root", str(tmp_path), "--grid", "no_such_grid"])
    assert "unknown grid 'no_such_grid': no conf/grid/no_such_grid.yaml (available:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        status_main(["--root", str(tmp_path), "task=x"])
    assert "only meaningful with --grid" in capsys.readouterr().err


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_killed_run_shows_stale_not_running_forever(tmp_path):
    """Before, a run killed by kill -9 stayed RUNNING in diffq-bench-status forever."""
    killed = _run(tmp_path, 0, "RUNNING", epoch=1)
    status_path = killed.status_path
    status_path.write_text(json.dumps({**json.loads(status_path.read_text()), "pid": _dead_pid()}))
    row = status.run_row(killed.folder, {})
    assert row["state"] == "STALE" and "is dead" in row["note"], row
    alive = _run(tmp_path, 1, "RUNNING", epoch=1)  # this very process: alive
    assert status.run_row(alive.folder, {})["state"] == "RUNNING"
    # another host: the pid cannot be checked, the heartbeat decides
    elsewhere = _run(tmp_path, 2, "RUNNING", epoch=1)
    old = json.loads(elsewhere.status_path.read_text())
    old.update(host="other-node", heartbeat="2000-01-01T00:00:00+00:00")
    elsewhere.status_path.write_text(json.dumps(old))
    row = status.run_row(elsewhere.folder, {})
    assert row["state"] == "STALE" and row["note"].startswith("no heartbeat for"), row
    now = datetime.datetime(2000, 1, 1, 0, 5, tzinfo=datetime.timezone.utc).timestamp()
    assert status.run_row(elsewhere.folder, {}, now=now)["state"] == "RUNNING"  # 5 min: alive
    assert status.liveness(old, now=now + status.STALE_AFTER_S) is not None


def test_heartbeat_refreshes_a_running_run(tmp_path):
    xp = _run(tmp_path, 0, "RUNNING")
    old = json.loads(xp.status_path.read_text())
    xp.status_path.write_text(json.dumps({**old, "heartbeat": "2000-01-01T00:00:00+00:00"}))
    xp.heartbeat()
    assert json.loads(xp.status_path.read_text())["heartbeat"] > "2000"
    assert json.loads(xp.status_path.read_text())["epoch"] == old["epoch"]


def test_garbage_status_json_shows_corrupt_with_its_path(tmp_path):
    """Before, a garbage status.json showed as NEW (never launched)."""
    xp = _run(tmp_path, 0, "RUNNING")
    xp.status_path.write_bytes(b"\x00garbage{")
    row = status.run_row(xp.folder, {})
    assert row["state"] == "CORRUPT" and str(xp.status_path) in row["note"], row
    assert "task.name=toy quant.name=none" in row["run"]


def test_run_failed_before_training_is_shown_as_such(tmp_path):
    xp = _run(tmp_path, 0, "FAILED", traceback="Traceback...\nDataMissingError: no data at /x")
    row = status.run_row(xp.folder, {})
    assert row["state"] == "FAILED" and row["epoch"] == "0/4"
    assert row["note"] == "failed before training: DataMissingError: no data at /x"
    assert row["run"] == "task.name=toy quant.name=none"


def test_pending_reason_is_shown_and_impossible_ones_say_what_to_change(tmp_path):
    xp = _run(tmp_path, 0)
    Xp.at(xp.folder).record_submission("7_0")
    row = status.run_row(xp.folder, {"7_0": "PENDING"}, reasons={"7_0": "PartitionConfig"})
    assert row["state"] == "QUEUED"
    assert row["note"].startswith("pending: PartitionConfig - can never start:")
    assert "hydra.launcher.cpus_per_task" in row["note"]
    row = status.run_row(xp.folder, {"7_0": "PENDING"}, reasons={"7_0": "Resources"})
    assert row["note"] == "pending: Resources"


def test_run_tested_on_a_subset_says_so(tmp_path):
    """A run evaluated on the first N items (task.eval_subset, e.g. +preset=debug) is flagged in
    the note column: its metric is not a real result (found by the first-hour walkthrough)."""
    cfg = OmegaConf.create({"paths": {"root": str(tmp_path)}, "task": {"name": "toy", "eval_subset": 4},
                            "quant": {"name": "none"}, "seed": 0, "train": {"epochs": 1}})
    xp = Xp(tmp_path, cfg)
    xp.create()
    xp.write_status("DONE", epoch=1)
    row = status.run_row(xp.folder, {})
    assert row["note"] == "tested on the first 4 items only (task.eval_subset=4)", row
    full = _run(tmp_path, 7, "DONE", epoch=4)
    assert status.run_row(full.folder, {})["note"] == "-"
    failed = Xp(tmp_path, OmegaConf.merge(cfg, {"seed": 1}))
    failed.create()
    failed.write_status("FAILED", traceback="boom")
    assert status.run_row(failed.folder, {})["note"] == \
        "failed before training: boom; tested on the first 4 items only (task.eval_subset=4)"
