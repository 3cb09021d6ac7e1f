"""Sweeps on a real one-node SLURM cluster started by scripts/slurm_test_cluster.sh (skipped, with the
reason, where it cannot run), plus unit tests of the squeue/sacct parsing.

The cluster tests run a 4-run grid of the embedded WikiText LM at debug size as one job array,
requeue a run mid-training with ``scontrol requeue`` and compare it with the uninterrupted run,
send USR2 (time limit / preemption) up to the requeue bound, check that a failing run is FAILED in
sacct and status.json, and that launching the grid again (or while its jobs are queued) submits
nothing. Interrupted runs use the runner's test task (tests/conftest.py ``ToyTask``, with a
per-step delay so a run can be caught mid-training). 1 CPU per job.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffq_bench.launch import slurm
from diffq_bench.xp import Xp

from slurm_cluster import REPO_ROOT, ClusterUnavailable, start_cluster, wait_for

# ------------------------------------------------------------------ unit: parsing (no cluster)


@pytest.mark.parametrize("spec,ids", [
    ("12", ["12"]), ("12_3", ["12_3"]), ("12_[0-2]", ["12_0", "12_1", "12_2"]),
    ("7_[1,4-5%2]", ["7_1", "7_4", "7_5"]), ("7_[0-6:3]", ["7_0", "7_3", "7_6"]),
])
def test_expand_job_ids(spec, ids):
    assert slurm.expand_job_ids(spec) == ids


def test_parse_table_maps_array_and_raw_ids():
    text = "15|12_3|RUNNING\n12|12_[4-5]|PENDING\n20|20|CANCELLED by 0\n21|21|COMPLETED+\nbad line\n"
    assert slurm._parse_table(text) == {"15": "RUNNING", "12_3": "RUNNING", "12_4": "PENDING",
                                        "12_5": "PENDING", "20": "CANCELLED", "21": "COMPLETED"}


def test_job_states_ignores_foreign_ids_and_live_states(monkeypatch):
    monkeypatch.setattr(slurm, "available", lambda: False)
    assert slurm.job_states([None, "", "local-3", "abc"]) == {}
    with pytest.raises(slurm.SlurmError, match="not on the PATH"):
        slurm.job_states(["3"])
    assert slurm.is_live("PENDING") and slurm.is_live("REQUEUED") and not slurm.is_live("FAILED")
    assert not slurm.is_live(None)


def test_current_job_id_and_restart_count(monkeypatch):
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    assert slurm.current_job_id() is None and slurm.restart_count() == 0
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    assert slurm.current_job_id() == "41"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert slurm.current_job_id() == "40_1" and slurm.restart_count() == 2


def test_launcher_rejects_bad_settings():
    from hydra_plugins.diffq_bench.slurm_launcher import SlurmLauncher
    with pytest.raises(ValueError, match="max_requeues"):
        SlurmLauncher(max_requeues=-1, submitit_folder="x", timeout_min=5)
    launcher = SlurmLauncher(submitit_folder="x", timeout_min=5.5)
    with pytest.raises(ValueError, match="timeout_min must be an integer"):
        launcher._executor()


# ------------------------------------------------------------------ the real cluster

GRID = """\
# @package _global_
grid:
  name: slurm4
  runs:
    - {quant: none, seed: "0,1"}
    - {quant: qat, quant.bits: "4,8"}
"""
# Fine-tuning on SLURM: a float run and two runs initialised from it (afterok on its job); the
# same with a parent that fails in its first step.
FT_GRID = """\
# @package _global_
grid:
  name: {name}
  runs:
    - {{task: {task}, quant: none, {tiny}}}
    - {{task: {task}, quant: "qat,lsq", init: "run:task={task} quant=none {spec}", {tiny}}}
"""
FT_TINY = {"task.n_train": 32, "task.hidden": 16, "train.epochs": 1}
# The grid: the embedded WikiText LM at debug size (1 layer, d=32, 2 epochs x 3 steps).
LM_DEBUG = ["task=wikitext_mini", "task.source=pydoc", "task.model.d_model=32", "task.model.ffn_dim=64",
            "task.model.n_layers=1", "train.epochs=2", "train.steps_per_epoch=3", "train.warmup_steps=0"]
# Interrupted runs: the runner's toy task, 4 epochs x 6 steps x 0.15 s of delay (TOY_TASK_DELAY)
# ~ 4 s of training, so a run can be caught in the middle of training.
TOY = ["task=toy", "task.n_train=96", "task.hidden=32", "train.epochs=4"]
# the test cluster has no GPU (the launcher asks one per task by default)
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
         "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null"]
# Runs the real CLI with the runner's test task registered (cloudpickle ships `task_fn` by value
# to the job; the job imports conftest from PYTHONPATH).
APP = """\
import hydra
from conftest import ToyTask
from diffq_bench.config import find_conf_dir


class ExplodingToyTask(ToyTask):
    name = "toy_exploding"

    def step(self, model, batch):
        raise FloatingPointError("deliberate failure in a training step")


def register():
    from diffq_bench.tasks import TASKS
    TASKS["toy"] = ToyTask
    TASKS["toy_exploding"] = ExplodingToyTask


def task_fn(cfg):
    from diffq_bench.cli import _hydra_task
    register()  # in the job
    _hydra_task(cfg)


register()  # in the sweeping process, which validates every config before launching


hydra.main(config_path=str(find_conf_dir()), config_name="config", version_base="1.3")(task_fn)()
"""


@pytest.fixture(scope="session")
def cluster():
    try:
        started = start_cluster()
    except ClusterUnavailable as exc:
        pytest.skip(f"real SLURM cluster unavailable: {exc}")
    yield started
    started.stop()


class Bench:
    """A copy of conf/ with the test grid and task, and a way to launch sweeps into a run store."""

    def __init__(self, base: Path):
        from fixtures import TOY_YAML
        self.base = base
        self.conf = base / "conf"
        shutil.copytree(REPO_ROOT / "conf", self.conf)
        (self.conf / "grid").mkdir(exist_ok=True)
        (self.conf / "grid" / "slurm4.yaml").write_text(GRID)
        (self.conf / "task").mkdir(exist_ok=True)
        (self.conf / "task" / "toy.yaml").write_text(TOY_YAML)
        (self.conf / "task" / "toy_exploding.yaml").write_text(TOY_YAML.replace("name: toy", "name: toy_exploding"))
        if not (self.conf / "task" / "wikitext_mini.yaml").exists():  # config.yaml's default task
            (self.conf / "task" / "wikitext_mini.yaml").write_text(TOY_YAML)
        for name, task in (("slurmft", "toy"), ("slurmftfail", "toy_exploding")):
            (self.conf / "grid" / f"{name}.yaml").write_text(FT_GRID.format(
                name=name, task=task, tiny=", ".join(f"{k}: {v}" for k, v in FT_TINY.items()),
                spec=" ".join(f"{k}={v}" for k, v in FT_TINY.items())))
        (base / "app.py").write_text(APP)
        # TOY_TASK_DELAY: seconds of sleep per step (not part of the run identity); SLURM passes the
        # submitting environment to the jobs
        # TOY_TASK_HOLD: while self.hold_file exists, toy runs wait after their first epoch (6
        # steps), so a test catches a run in training without racing it (released by deleting it)
        self.hold_file = base / "hold"
        self.env = {**os.environ, "DIFFQ_BENCH_CONF": str(self.conf), "TOY_TASK_DELAY": "0.15",
                    "TOY_TASK_HOLD": f"6:{self.hold_file}",
                    "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}

    def command(self, root: str, *overrides: str) -> list:
        return [sys.executable, str(self.base / "app.py"), "-m", f"paths.root={self.base / root}",
                f"paths.data={self.base / 'data'}", f"paths.cache={self.base / 'cache'}",
                "runtime.progress=false", *SLURM, *overrides]

    def launch(self, root: str, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(root, *overrides), capture_output=True, text=True,
                              timeout=timeout, env=self.env, cwd=self.base)

    def start(self, root: str, *overrides: str) -> subprocess.Popen:
        """Launch a sweep in the background (``communicate()`` for its output)."""
        return subprocess.Popen(self.command(root, *overrides), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env, cwd=self.base)

    def status(self, root: str, *args: str) -> str:
        return subprocess.run([sys.executable, "-c", "from diffq_bench.cli import status_main; status_main()",
                               "--root", str(self.base / root), *args], capture_output=True,
                              text=True, timeout=120, env=self.env, cwd=self.base).stdout

    def runs(self, root: str) -> dict:
        out = {}
        for folder in sorted((self.base / root / "xps").glob("*")):
            status = json.loads((folder / "status.json").read_text())
            result = folder / "result.json"
            out[folder.name] = (status, json.loads(result.read_text()) if result.exists() else None)
        return out


def _sacct(job_ids):
    return slurm.job_states(job_ids)


@pytest.fixture(scope="module")
def bench(cluster, tmp_path_factory):
    return Bench(tmp_path_factory.mktemp("slurm_bench"))


@pytest.fixture(scope="module")
def grid_sweep(bench):
    """The 4-run grid launched once as a job array (shared by the tests below)."""
    t0 = time.monotonic()
    out = bench.launch("store", "+grid=slurm4", *LM_DEBUG)
    return out, time.monotonic() - t0


def _output(proc) -> str:
    return proc.stdout + proc.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_grid_runs_as_one_job_array(bench, grid_sweep):
    proc, elapsed = grid_sweep
    assert proc.returncode == 0, _output(proc)[-3000:]
    assert "4 runs: 4 to launch, 0 done, 0 queued/running" in _output(proc)
    # one line per run as it finishes, then the sweep's table (the same as diffq-bench-table --grid)
    assert sorted(re.findall(r"\[(\d)/4\] DONE .* \| test ppl ", _output(proc))) == ["1", "2", "3", "4"]
    assert "sweep table: 4 of 4 run(s) finished (diffq-bench-table --root " in proc.stdout
    runs = bench.runs("store")
    assert len(runs) == 4
    job_ids = [Xp.at(bench.base / "store" / "xps" / sig).read_submissions()[-1]["job_id"] for sig in runs]
    assert len({j.split("_")[0] for j in job_ids}) == 1, f"not one array: {job_ids}"
    assert sorted(j.split("_")[1] for j in job_ids) == ["0", "1", "2", "3"]
    # the launcher returns when the last result is written; the job step may still be ending
    wait_for(lambda: set(_sacct(job_ids).values()) == {"COMPLETED"}, 30, "sacct: all 4 COMPLETED")
    for status, result in runs.values():
        assert status["state"] == "DONE" and status["grids"] == ["slurm4"], status
        assert result is not None and result["grids"] == ["slurm4"]
    table = subprocess.run([sys.executable, "-c", "from diffq_bench.cli import table_main; table_main()",
                            "--root", str(bench.base / "store"), "--grid", "slurm4", "--format", "csv"],
                           capture_output=True, text=True, env=bench.env, timeout=120)
    assert table.returncode == 0, table.stderr
    assert all(sig in table.stdout for sig in runs), table.stdout
    text = bench.status("store", "--grid", "slurm4", *LM_DEBUG)
    assert text.strip().endswith("4 runs: 4 DONE"), text
    assert "quant=qat quant.bits=8" in text
    without = bench.status("store", "--grid", "slurm4")  # the grid at full size: never launched
    assert without.strip().endswith("8 runs: 4 DONE, 4 NEW"), without
    assert text.count("test_ppl=") == 4
    print(f"4-run grid as a job array: {elapsed:.1f} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_relaunching_the_grid_submits_nothing(bench, grid_sweep):
    assert grid_sweep[0].returncode == 0
    before = sum(len(Xp.at(p).read_submissions()) for p in (bench.base / "store" / "xps").iterdir())
    proc = bench.launch("store", "+grid=slurm4", *LM_DEBUG)
    assert proc.returncode == 0, _output(proc)[-3000:]
    assert "4 runs: 0 to launch, 4 done, 0 queued/running" in _output(proc)
    assert "nothing to launch" in _output(proc)
    after = sum(len(Xp.at(p).read_submissions()) for p in (bench.base / "store" / "xps").iterdir())
    assert after == before == 4


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_run_resumes_to_the_uninterrupted_result(cluster, bench):
    """The same config in two stores: one left alone, one hit by `scontrol requeue` mid-training."""
    args = (*TOY, "quant=qat", "seed=3", "hydra.launcher.wait=false")
    cluster.start_bumper()
    bench.hold_file.touch()  # both runs wait after their first epoch until released
    try:
        for root in ("reference", "requeue"):
            proc = bench.launch(root, *args)
            assert proc.returncode == 0, _output(proc)[-3000:]
        (folder,) = list((bench.base / "requeue" / "xps").iterdir())
        (ref_folder,) = list((bench.base / "reference" / "xps").iterdir())
        assert folder.name == ref_folder.name  # same signature: the store root is not part of it
        job = Xp.at(folder).read_submissions()[-1]["job_id"]
        again = bench.launch("requeue", *args)  # queued or running (held): must not be submitted again
        assert "1 runs: 0 to launch, 0 done, 1 queued/running" in _output(again), _output(again)[-2000:]
        assert len(Xp.at(folder).read_submissions()) == 1

        def state(run):
            path = run / "status.json"
            return json.loads(path.read_text()) if path.exists() else {}
        wait_for(lambda: state(folder).get("state") == "RUNNING" and state(folder).get("epoch", 0) >= 1,
                 120, "the run to finish its first epoch")
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
        wait_for(lambda: state(folder).get("attempt") == 2, 120, "the requeued run to start again")
        bench.hold_file.unlink()
        wait_for(lambda: state(folder).get("state") == "DONE" and state(ref_folder).get("state") == "DONE",
                 150, "both runs to finish")
    finally:
        bench.hold_file.unlink(missing_ok=True)
        cluster.stop_bumper()
    status = state(folder)
    assert status["requeues"] == 1 and status["attempt"] == 2, status
    assert state(ref_folder)["requeues"] == 0
    assert "resumed at epoch" in (folder / "log.txt").read_text()
    result = json.loads((folder / "result.json").read_text())["metrics"]
    reference = json.loads((ref_folder / "result.json").read_text())["metrics"]
    assert {k: v for k, v in result.items() if k != "wall_time_s"} == \
        {k: v for k, v in reference.items() if k != "wall_time_s"}
    wait_for(lambda: _sacct([job]).get(job) == "COMPLETED", 30, f"sacct to show {job} COMPLETED")


@pytest.fixture(scope="module")
def failing_sweep(bench):
    """A blocking sweep of one run that fails in training, started in the background (it uses the
    CPU the USR2 test leaves free) and checked by test_failing_run_is_failed_in_sacct_and_status.
    The config is valid; APP's ExplodingToyTask raises in its first training step."""
    proc = bench.start("failing", *TOY, "quant=none", "task=toy_exploding")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.mark.slurm
@pytest.mark.slow
def test_usr2_checkpoints_and_requeues_up_to_max_requeues(cluster, bench, failing_sweep):
    """USR2 (time limit near, or preemption) -> checkpoint + self-requeue + resume; the second
    USR2 exceeds max_requeues=1 -> FAILED in status.json and sacct, requeues recorded."""
    status_path = None

    def status():
        return json.loads(status_path.read_text()) if status_path and status_path.exists() else {}
    cluster.start_bumper()
    bench.hold_file.touch()  # the run waits after its first epoch (and after resuming) until released
    try:
        proc = bench.launch("usr2", *TOY, "quant=none", "seed=5", "hydra.launcher.wait=false",
                            "hydra.launcher.max_requeues=1")
        assert proc.returncode == 0, _output(proc)[-3000:]
        (folder,) = list((bench.base / "usr2" / "xps").iterdir())
        status_path = folder / "status.json"
        job = Xp.at(folder).read_submissions()[-1]["job_id"]
        wait_for(lambda: status().get("state") == "RUNNING" and status().get("epoch", 0) >= 1, 120,
                 "the run to finish its first epoch")
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        wait_for(lambda: status().get("state") == "RUNNING" and status().get("attempt") == 2, 120,
                 "the requeued run to start again")
        assert status()["requeues"] == 1
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        wait_for(lambda: status().get("state") == "FAILED", 60, "the run to give up")
    finally:
        bench.hold_file.unlink(missing_ok=True)
        cluster.stop_bumper()
    final = status()
    assert "max_requeues=1" in final["traceback"] and final["requeues"] == 2, final
    log = (folder / "log.txt").read_text()
    assert "resumed at epoch" in log and log.count("preempted at epoch") == 2
    wait_for(lambda: _sacct([job]).get(job) == "FAILED", 60, f"sacct to show {job} FAILED")


@pytest.mark.slurm
@pytest.mark.slow
def test_failing_run_is_failed_in_sacct_and_status(bench, failing_sweep):
    stdout, stderr = failing_sweep.communicate(timeout=240)
    proc = subprocess.CompletedProcess(failing_sweep.args, failing_sweep.returncode, stdout, stderr)
    assert proc.returncode != 0
    assert "1 of 1 run(s) FAILED" in _output(proc), _output(proc)[-3000:]
    (folder,) = list((bench.base / "failing" / "xps").iterdir())
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "FAILED", status
    assert "FloatingPointError: deliberate failure" in (status["traceback"] or ""), status
    job = Xp.at(folder).read_submissions()[-1]["job_id"]
    wait_for(lambda: _sacct([job]).get(job) == "FAILED", 60, f"sacct to show {job} FAILED")
    assert "FAILED" in bench.status("failing")


@pytest.mark.slurm
@pytest.mark.slow
def test_fine_tuned_runs_wait_for_their_float_run(bench):
    proc = bench.launch("ft", "+grid=slurmft", timeout=300)
    assert proc.returncode == 0, _output(proc)[-3000:]
    runs = bench.runs("ft")
    assert sorted(r["quant"] for _, r in runs.values()) == ["lsq", "none", "qat"]
    parent = next(sig for sig, (_, r) in runs.items() if r["quant"] == "none")
    parent_job = Xp.at(bench.base / "ft" / "xps" / parent).read_submissions()[-1]["job_id"]
    for sig, (status, result) in runs.items():
        if sig == parent:
            continue
        sub = Xp.at(bench.base / "ft" / "xps" / sig).read_submissions()[-1]
        assert sub["after"] == parent_job and result["axes"]["init.run"] == parent
        assert status["state"] == "DONE"


@pytest.mark.slurm
@pytest.mark.slow
def test_a_failed_float_run_fails_its_fine_tuned_runs(bench):
    proc = bench.launch("ftfail", "+grid=slurmftfail", timeout=300)
    assert proc.returncode != 0
    assert "3 of 3 run(s) FAILED" in _output(proc), _output(proc)[-3000:]
    statuses = [status for status, _ in bench.runs("ftfail").values()]
    assert {s["state"] for s in statuses} == {"FAILED"}
    assert sum("FAILED, so this run was not started" in s["traceback"] for s in statuses) == 2


def test_impossible_pending_reasons_say_what_to_change():
    assert "hydra.launcher.cpus_per_task" in slurm.impossible_reason("PartitionConfig")
    assert "qos" in slurm.impossible_reason("InvalidQOS")
    assert slurm.impossible_reason("Resources") is None and slurm.impossible_reason("Priority") is None
    assert slurm.impossible_reason("BeginTime") is None and slurm.impossible_reason("") is None
    assert slurm.impossible_reason("ReqNodeNotAvail") is not None  # names no existing node
    assert slurm._parse_rows("15|12_3|PENDING|PartitionConfig\n16|16|PENDING|None\n") == {
        "15": ("PENDING", "PartitionConfig"), "12_3": ("PENDING", "PartitionConfig"), "16": ("PENDING", "")}


@pytest.mark.slurm
def test_job_info_reports_the_pending_reason(cluster, tmp_path):
    job = subprocess.run(["sbatch", "--parsable", "--hold", "-o", str(tmp_path / "out"), "--wrap", "true"],
                         capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    try:
        wait_for(lambda: slurm.job_info([job]).get(job, ("", ""))[1] != "", 30, "a pending reason")
        assert slurm.job_info([job])[job] == ("PENDING", "JobHeldUser")
    finally:
        subprocess.run(["scancel", job], timeout=30)


@pytest.mark.slurm
@pytest.mark.slow
def test_impossible_job_fails_the_launch_within_a_minute(bench):
    """Before: cpus_per_task larger than the node left the job pending (Reason=PartitionConfig)
    and the launcher waiting forever, and relaunches said "live: job is PENDING"."""
    too_many = f"hydra.launcher.cpus_per_task={(os.cpu_count() or 1) + 6}"
    t0 = time.monotonic()
    proc = bench.launch("impossible", *TOY, "quant=none", too_many, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and elapsed < 60, (elapsed, _output(proc)[-3000:])
    out = _output(proc)
    assert "can never start (pending, Reason=PartitionConfig)" in out and "hydra.launcher.cpus_per_task" in out
    (folder,) = list((bench.base / "impossible" / "xps").iterdir())
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "FAILED" and "PartitionConfig" in status["traceback"]
    job = Xp.at(folder).read_submissions()[-1]["job_id"]
    wait_for(lambda: _sacct([job]).get(job) == "CANCELLED", 30, f"sacct to show {job} CANCELLED")
    again = bench.launch("impossible", *TOY, "quant=none", too_many, "hydra.launcher.wait=false", timeout=120)
    assert "1 runs: 1 to launch" in _output(again), _output(again)[-2000:]  # not blocked by the old job
    assert again.returncode != 0 and "PartitionConfig" in _output(again)  # wait=false checks too


@pytest.mark.slurm
@pytest.mark.slow
def test_scancel_of_a_running_array_task_is_cancelled_everywhere(bench):
    """Before: sacct CANCELLED, status.json QUEUED with requeues=1, and the sweep FAILED with a
    submitit UncompletedJobError and a pickle path."""
    sweep = bench.start("scancel", *TOY, "quant=none", "seed=7,8")  # two runs: one job array
    try:
        folder = None

        def running():
            nonlocal folder
            for path in (bench.base / "scancel" / "xps").glob("*/status.json"):
                status = json.loads(path.read_text())
                if status.get("state") == "RUNNING" and status.get("epoch", 0) >= 1:
                    folder = path.parent
                    return True
            return False
        wait_for(running, 120, "a run to finish its first epoch")
        job = Xp.at(folder).read_submissions()[-1]["job_id"]
        assert "_" in job  # an array task
        subprocess.run(["scancel", job], check=True, timeout=30)
        stdout, stderr = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
    out = stdout + stderr
    assert sweep.returncode != 0
    assert "1 of 2 run(s) CANCELLED" in out and f"SLURM job {job} was cancelled (scancel)" in out, out[-3000:]
    assert "FAILED" not in out.split("run(s) CANCELLED")[0].splitlines()[-1]  # the other run is fine
    assert "UncompletedJobError" not in out and ".pkl" not in out
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "CANCELLED" and status["requeues"] == 0, status
    assert status["reason"].startswith(f"SLURM job {job} was cancelled")
    assert (folder / "checkpoint.th").exists()
    wait_for(lambda: _sacct([job]).get(job) == "CANCELLED", 30, f"sacct to show {job} CANCELLED")
    text = bench.status("scancel")
    assert "CANCELLED" in text and "STALE" not in text and text.strip().endswith("2 runs: 1 CANCELLED, 1 DONE"), text
    again = bench.launch("scancel", *TOY, "quant=none", "seed=7,8")  # resumes the cancelled run only
    assert again.returncode == 0, _output(again)[-3000:]
    assert "2 runs: 1 to launch, 1 done" in _output(again)
    assert "resumed at epoch" in (folder / "log.txt").read_text()
    assert json.loads((folder / "status.json").read_text())["state"] == "DONE"


@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_job_runs_one_data_parallel_run(bench):
    """hydra.launcher.tasks_per_node=2: each run of the sweep is a 2-task job (gloo), DONE once,
    with the same signature and result as the same run in one process."""
    toy = TOY[:-1] + ["train.epochs=2", "task.dropout=0", "quant=lsq", "quant.min_size=0"]
    single = bench.launch("dp1", *toy)
    assert single.returncode == 0, single.stderr[-3000:]
    double = bench.launch("dp2", *toy, "hydra.launcher.tasks_per_node=2")
    assert double.returncode == 0, double.stderr[-3000:]
    ((sig1, (_, r1)),) = bench.runs("dp1").items()
    ((sig2, (status, r2)),) = bench.runs("dp2").items()
    assert sig1 == sig2 and status["state"] == "DONE" and status["env"]["processes"] == 2
    assert r2["metrics"]["test_acc"] == pytest.approx(r1["metrics"]["test_acc"], abs=3.2)
    assert r2["metrics"]["true_size_mb"] == pytest.approx(r1["metrics"]["true_size_mb"], rel=1e-6)
