"""``hydra.launcher.dry_run=true`` on the SLURM launcher prints the job arrays, each job's resources,
the GPU-hours at most and the runs it would skip, and never calls sbatch; a request that can only
fail (device=cuda in jobs without a GPU, more tasks per node than GPUs) is refused in one line, exit
2, before anything is submitted. Before, a sweep could only be checked by submitting it, and the
README's SLURM commands asked for no GPU (gpus_per_node defaulted to null)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffq_bench.config import ConfigError, compose, find_conf_dir
from diffq_bench.launch import resources
from diffq_bench.xp import Xp

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("gres, gpus", [("gpu:4", 4), ("gpu:a100:2", 2), ("gpu", 1), ("gpu:a100", 1),
                                        ("gpu:2,tmpdisk:100", 2), ("tmpdisk:100", 0), (None, 0)])
def test_gres_gpus(gres, gpus):
    assert resources.gres_gpus(gres) == gpus


@pytest.mark.parametrize("params, gpus", [
    ({"gpus_per_node": 8}, 8),
    ({"gpus_per_node": None}, 0),
    ({"gpus_per_node": None, "gpus_per_task": 1, "tasks_per_node": 4}, 4),
    ({"gpus_per_node": None, "gres": "gpu:v100:2"}, 2),
    ({"gpus_per_node": None, "additional_parameters": {"gres": "gpu:3"}}, 3),
    ({"gpus_per_node": None, "additional_parameters": {"gpus-per-node": "a100:2"}}, 2),
])
def test_gpus_per_node_from_any_spelling(params, gpus):
    assert resources.gpus_per_node(params) == gpus


def test_check_refuses_what_can_only_fail_and_warns_about_the_cpu():
    no_gpu = resources.request({"gpus_per_node": None, "timeout_min": 60})
    errors, warnings = resources.check(no_gpu, ["cuda", "auto"])
    assert errors == ["device=cuda but hydra.launcher.gpus_per_node is null: the jobs would get no GPU and "
                      "fail; set hydra.launcher.gpus_per_node=N (one per task)"]
    assert warnings[0].startswith("gpus_per_node is null: jobs get no GPU (device=auto trains on the CPU)")
    assert resources.check(no_gpu, ["cpu"]) == ([], [])  # a CPU sweep on a CPU cluster is fine
    shared = resources.request({"gpus_per_node": 1, "tasks_per_node": 2, "timeout_min": 60})
    errors, _ = resources.check(shared, ["auto"])
    assert errors == ["hydra.launcher.tasks_per_node=2 but gpus_per_node=1: each process of a data-parallel "
                      "run needs its own GPU; set hydra.launcher.gpus_per_node=2 (or device=cpu)"]
    assert resources.check(shared, ["cpu"])[0] == []  # gloo on CPU: no GPU per process needed
    one = resources.request({"gpus_per_node": 1, "timeout_min": 60})
    assert "device=cuda:1 but each node gets 1 GPU(s)" in resources.check(one, ["cuda:1"])[0][0]
    assert resources.check(one, ["cpu"])[1] == ["device=cpu but hydra.launcher.gpus_per_node=1: the GPUs "
                                                "are reserved and unused"]
    with pytest.raises(ConfigError, match="timeout_min must be an integer number of minutes >= 1, got 5.5"):
        resources.request({"timeout_min": 5.5})


def test_gpu_hours_is_the_time_limit_bound():
    req = resources.request({"nodes": 2, "gpus_per_node": 8, "timeout_min": 90})
    assert resources.gpu_hours(3, req) == 3 * 2 * 8 * 1.5


def test_default_slurm_launcher_asks_one_gpu_per_task():
    """The README's `hydra/launcher=slurm` commands must get GPUs on a GPU cluster as written."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        for tasks in (1, 4):
            cfg = hydra_compose("config", overrides=["hydra/launcher=slurm", f"hydra.launcher.tasks_per_node={tasks}"],
                                return_hydra_config=True)
            assert cfg.hydra.launcher.gpus_per_node == tasks and cfg.hydra.launcher.dry_run is False


def _fake_slurm(folder: Path) -> dict:
    """sbatch/squeue/sacct/scontrol that only record that they were called (and fail)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "squeue", "sacct", "scontrol", "scancel"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $@" >> {folder / "calls.txt"}\nexit 1\n')
        script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _cli(args, cwd, env):
    return subprocess.run([sys.executable, "-c", "from diffq_bench.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.slow
def test_dry_run_prints_the_arrays_resources_gpu_hours_and_skips_and_submits_nothing(tmp_path):
    env = _fake_slurm(tmp_path)
    root = tmp_path / "store"
    done = Xp(root, compose(["task=digits", "quant=none", "seed=0", f"paths.root={root}"]))
    done.create()
    done.write_result({"sig": done.sig})
    done.write_status("DONE")
    out = _cli(["-m", "task=digits", "quant=none,diffq", "seed=0,1", f"paths.root={root}",
                "hydra/launcher=slurm", "hydra.launcher.dry_run=true", "hydra.launcher.partition=gpu",
                "hydra.launcher.timeout_min=90", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4"],
               tmp_path, env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert not (tmp_path / "calls.txt").exists(), (tmp_path / "calls.txt").read_text()
    assert "dry run (hydra.launcher.dry_run=true): nothing submitted; a real launch would submit 3 run(s) " \
           "in 1 SLURM job array(s)" in out.stdout, text
    assert "job array 1: 3 job(s), at most 3 at once" in out.stdout
    assert out.stdout.count("  #") == 3 and "quant=diffq" in out.stdout
    for line in ("partition        gpu", "nodes            2", "tasks_per_node   4", "gpus_per_node    4",
                 "cpus_per_task    8", "time             90 min (1.5 h)", "--requeue        True"):
        assert f"  {line}" in out.stdout, out.stdout
    assert "GPU-hours: at most 36.0 (3 run(s) x 2 node(s) x 4 GPU(s) x 1.5 h; the time-limit bound" in out.stdout
    assert f"skipped: 1 run(s):\n  {done.sig} done (result exists): task=digits quant=none seed=0" in out.stdout
    assert [p.name for p in (root / "xps").iterdir()] == [done.sig]  # no run folder, no submission
    assert not list(root.rglob(".submitit")) and not list(root.rglob("submissions.jsonl"))
    cpu = _cli(["-m", "task=digits", "seed=0,1", f"paths.root={root}", "hydra/launcher=slurm",
                "hydra.launcher.dry_run=true", "hydra.launcher.gpus_per_node=null"], tmp_path, env)
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    assert "warning: gpus_per_node is null: jobs get no GPU" in cpu.stdout
    assert "gpus_per_node    none" in cpu.stdout and "GPU-hours: at most 0.0" in cpu.stdout
    assert not (tmp_path / "calls.txt").exists()


@pytest.mark.slow
def test_submitting_cuda_runs_without_gpus_is_refused_before_sbatch(tmp_path):
    env = _fake_slurm(tmp_path)
    out = _cli(["-m", "task=digits", "seed=0,1", "device=cuda", f"paths.root={tmp_path / 'store'}",
                "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null"], tmp_path, env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "diffq-bench: config error: device=cuda but hydra.launcher.gpus_per_node is null: the jobs would get "
        "no GPU and fail; set hydra.launcher.gpus_per_node=N (one per task)")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "calls.txt").exists() and not (tmp_path / "store" / "xps").exists()
