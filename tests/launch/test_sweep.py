"""Grid expansion, the launch plan (skip DONE / live runs) and the grid sweeper plugin end to end."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from diffq_bench.launch import plan as sweep
from diffq_bench.xp import Xp

REPO = Path(__file__).resolve().parents[2]


def test_entry_overrides_formats_scalars():
    assert sweep.entry_overrides({"task": "lm", "quant.bits": 4, "lambda": "1,5", "amp": False,
                                  "x": None}) == ["task=lm", "quant.bits=4", "lambda=1,5",
                                                  "amp=false", "x=null"]


@pytest.mark.parametrize("entry", [{}, [], "task=lm", {"lambda": [1, 2]}, {"a": {"b": 1}}])
def test_entry_overrides_rejects_bad_entries(entry):
    with pytest.raises(sweep.GridError, match="run #0"):
        sweep.expand_grid([entry], [], "g")


def test_expand_grid_product_within_entries_and_with_command_line():
    runs = [{"task": "lm", "quant": "none"},
            {"task": "lm", "quant": "diffq", "lambda": "1,5", "group_size": "8,16"}]
    jobs = sweep.expand_grid(runs, ["+grid=g", "seed=0,1"])
    assert len(jobs) == (1 + 4) * 2
    assert ["task=lm", "quant=none", "+grid=g", "seed=0"] in jobs
    assert ["task=lm", "quant=diffq", "lambda=5", "group_size=16", "+grid=g", "seed=1"] in jobs


def test_expand_grid_command_line_wins_and_duplicates_collapse():
    runs = [{"task": "big", "lambda": "1,2"}, {"task": "big", "lambda": 1}]
    jobs = sweep.expand_grid(runs, ["task=small"])
    assert jobs == [["lambda=1", "task=small"], ["lambda=2", "task=small"]]


def test_expand_grid_without_grid_is_the_command_line_product():
    assert sweep.expand_grid(None, ["a=1,2", "b=x"]) == [["a=1", "b=x"], ["a=2", "b=x"]]
    assert sweep.expand_grid(None, []) == [[]]


def test_expand_rejects_interval_sweeps_and_bad_runs():
    with pytest.raises(sweep.GridError, match="only comma lists"):
        sweep.expand_grid(None, ["lr=interval(0.1,1)"])
    with pytest.raises(sweep.GridError, match="must be a list"):
        sweep.expand_grid({"task": "lm"}, [], "g")


def _cfg(root, **kw):
    return OmegaConf.create({"paths": {"root": str(root)}, "task": {"name": "t"}, **kw})


def _done(root, cfg):
    xp = Xp(root, cfg)
    xp.create()
    xp.write_result({"sig": xp.sig})
    xp.write_status("DONE")
    return xp


def test_plan_skips_done_and_live_runs_and_relaunches_the_rest(tmp_path):
    cfgs = [_cfg(tmp_path, seed=s) for s in range(5)]
    _done(tmp_path, cfgs[0])
    live = Xp(tmp_path, cfgs[1])
    Xp.at(live.folder).record_submission("7_1", grid="g")
    ended = Xp(tmp_path, cfgs[2])
    Xp.at(ended.folder).record_submission("7_2")
    failed = Xp(tmp_path, cfgs[3])
    failed.create()
    failed.write_status("FAILED", traceback="boom", job_id="8")
    asked = []

    def states(ids):
        asked.append(sorted(ids))
        return {"7_1": "PENDING", "7_2": "CANCELLED", "8": "FAILED"}

    runs = [([f"seed={i}"], c) for i, c in enumerate(cfgs)] + [(["seed=0", "x=dup"], cfgs[0])]
    planned = sweep.plan(runs, states=states)
    assert [p.action for p in planned] == ["done", "live", "launch", "launch", "launch"]
    assert planned[1].job_id == "7_1" and "PENDING" in planned[1].reason
    assert asked == [["7_1", "7_2", "8"]]  # one scheduler query for the whole sweep
    assert "5 runs: 3 to launch, 1 done, 1 queued/running" in sweep.summary(planned)
    forced = sweep.plan(runs, force=True, states=states)
    assert [p.action for p in forced] == ["launch", "live", "launch", "launch", "launch"]


def test_plan_sees_local_running_process(tmp_path):
    cfg = _cfg(tmp_path)
    xp = Xp(tmp_path, cfg)
    xp.create()
    xp.write_status("RUNNING")  # pid = this (alive) process, no job id
    assert sweep.plan([([], cfg)], states=dict)[0].action == "live"
    status = json.loads(xp.status_path.read_text())
    status["pid"] = 2 ** 22 + 1  # above pid_max: no such process
    xp.status_path.write_text(json.dumps(status))
    assert sweep.plan([([], cfg)], states=dict)[0].action == "launch"


def test_submissions_roundtrip(tmp_path):
    folder = tmp_path / "run"
    Xp.at(folder).record_submission("3_0", grid="g")
    Xp.at(folder).record_submission(4)
    subs = Xp.at(folder).read_submissions()
    assert [s["job_id"] for s in subs] == ["3_0", "4"] and subs[0]["grid"] == "g"
    assert Xp.at(folder).known_job_ids({"job_id": "9"}) == ["4", "9"]


APP = '''
import os
import time
import hydra
from diffq_bench.xp import Xp

@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg):
    start = time.time()
    try:
        time.sleep(cfg.sleep)
        if cfg.fail or cfg.a == cfg.fail_on:
            raise RuntimeError("deliberate failure")
    finally:
        with open(cfg.paths.root + "/spans.txt", "a") as f:
            f.write(f"{start} {time.time()}\\n")
        with open(cfg.paths.root + "/threads.txt", "a") as f:
            f.write(os.environ.get("OMP_NUM_THREADS", "unset") + "\\n")
    xp = Xp(cfg.paths.root, cfg)
    xp.create()
    with open(cfg.paths.root + "/calls.txt", "a") as f:
        f.write(xp.sig + "\\n")
    xp.write_result({"sig": xp.sig, "value": cfg.a * 10 + cfg.b})
    xp.write_status("DONE")

main()
'''


@pytest.fixture
def toy_app(tmp_path):
    """A tiny Hydra app using the grid sweeper and the run store (no diffq-bench task needed)."""
    conf = tmp_path / "conf"
    (conf / "grid").mkdir(parents=True)
    (conf / "config.yaml").write_text(textwrap.dedent(f"""\
        defaults:
          - _self_
          - override hydra/sweeper: grid
        a: 0
        b: 0
        fail: false
        fail_on: -1
        sleep: 0.0
        paths: {{root: {tmp_path / 'store'}}}
        hydra:
          sweeper:
            validate: false   # not a diffq-bench config
          sweep:
            dir: {tmp_path / 'multirun'}/${{now:%H-%M-%S-%f}}
        """))
    (conf / "grid" / "toy.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        grid:
          name: toy
          runs:
            - {a: 1}
            - {a: "2,3", b: 5}
        """))
    (conf / "hydra" / "launcher").mkdir(parents=True)
    for name in ("local.yaml", "local_parallel.yaml"):
        shutil.copy(REPO / "conf" / "hydra" / "launcher" / name, conf / "hydra" / "launcher")
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "store").mkdir()

    def run(*args):
        return subprocess.run([sys.executable, str(tmp_path / "app.py"), "-m", *args],
                              capture_output=True, text=True, timeout=120)
    return tmp_path, run


@pytest.mark.slow
def test_grid_sweeper_runs_a_grid_once(toy_app):
    root, run = toy_app
    out = run("+grid=toy")
    assert out.returncode == 0, out.stdout + out.stderr
    calls = (root / "store" / "calls.txt").read_text().split()
    assert len(calls) == 3
    values = sorted(json.loads((root / "store" / "xps" / s / "result.json").read_text())["value"] for s in calls)
    assert values == [10, 25, 35]
    again = run("+grid=toy", "b=5,7")  # grid x command line: b=5 runs exist for a=2,3 only
    assert again.returncode == 0, again.stdout + again.stderr
    assert "6 runs: 4 to launch, 2 done, 0 queued/running" in again.stdout + again.stderr
    assert len((root / "store" / "calls.txt").read_text().split()) == 7
    last = run("+grid=toy", "b=5,7")
    assert "nothing to launch" in last.stdout + last.stderr
    assert len((root / "store" / "calls.txt").read_text().split()) == 7


@pytest.mark.slow
def test_grid_sweeper_reports_failures_and_exits_non_zero(toy_app):
    root, run = toy_app
    out = run("a=1,2", "fail=true")
    assert out.returncode != 0
    assert "2 of 2 run(s) FAILED" in out.stderr and "deliberate failure" in out.stderr


@pytest.mark.slow
def test_local_parallel_launcher_caps_concurrency_and_reports_failures(toy_app):
    root, run = toy_app
    out = run("a=1,2,3", "fail_on=2", "sleep=1.0", "hydra/launcher=local_parallel",
              "hydra.launcher.max_parallel=2", "hydra.launcher.poll_s=0.2")
    assert out.returncode != 0 and "1 of 3 run(s) FAILED" in out.stderr, out.stdout + out.stderr
    assert "RuntimeError: deliberate failure" in out.stderr
    assert len((root / "store" / "calls.txt").read_text().split()) == 2
    spans = [tuple(map(float, line.split())) for line in (root / "store" / "spans.txt").read_text().splitlines()]
    assert len(spans) == 3
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2
    # each run gets its share of a single run's threads, not one thread per core (oversubscription)
    single = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                            capture_output=True, text=True, check=True).stdout.strip()
    share = str(max(1, int(single) // 2))
    assert (root / "store" / "threads.txt").read_text().split() == [share] * 3


def test_single_run_and_a_sweep_of_one_use_the_same_threads(monkeypatch):
    """Before: a sweep gave each run os.cpu_count() // max_parallel threads (logical CPUs, and
    OMP_NUM_THREADS ignored) while a single run used torch's default: a run resumed by the other
    way changed thread count (and its numbers)."""
    from hydra_plugins.diffq_bench.local_launcher import LocalParallelLauncher
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert LocalParallelLauncher(max_parallel=1).threads_per_job == int(single) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    single = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert LocalParallelLauncher(max_parallel=1).threads_per_job == int(single)


def test_local_parallel_launcher_rejects_bad_limit():
    from hydra_plugins.diffq_bench.local_launcher import LocalParallelLauncher
    with pytest.raises(ValueError, match="max_parallel must be an integer >= 1"):
        LocalParallelLauncher(max_parallel=0)
    with pytest.raises(ValueError, match="threads_per_job must be an integer >= 1"):
        LocalParallelLauncher(max_parallel=1, threads_per_job=0)
    assert LocalParallelLauncher(max_parallel=1, threads_per_job=3).threads_per_job == 3


@pytest.mark.slow
def test_invalid_run_config_stops_the_sweep_before_launching(tmp_path):
    out = subprocess.run([sys.executable, "-c", "from diffq_bench.cli import main; main()", "-m",
                          "lambda=-1,1", "quant=diffq", f"paths.root={tmp_path}"],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode != 0
    assert "1 of 2 run(s) have an invalid config; nothing was launched" in out.stderr, out.stderr[-2000:]
    assert "lambda" in out.stderr and not (tmp_path / "xps").exists()
