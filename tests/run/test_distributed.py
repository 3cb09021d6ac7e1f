"""Data parallelism (torch.distributed, gloo on CPU): two processes started by torchrun.

For every quantizer: both ranks end with bitwise identical parameters, buffers and quantizer
state; a 2-process run equals the 1-process run of the same global batch (deterministic
quantizers to float rounding, noise-based ones within a tolerance); one DONE run and one result.
Also: sharded evaluation equals whole evaluation exactly, a SIGTERM'd 2-process run resumes to
the uninterrupted result, and a rank that raises ends the run FAILED with its traceback, without
hanging.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffq_bench import cli, distributed
from diffq_bench.config import ConfigError, find_conf_dir
from diffq_bench.data.images import shard_indices
from diffq_bench.tasks import get_task
from diffq_bench.xp import Xp

from fixtures import TOY_YAML

CONF_QUANTS = sorted(p.stem for p in (find_conf_dir() / "quant").glob("*.yaml") if p.stem != "none")

WORKER = Path(__file__).with_name("ddp_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
#: the toy without dropout: 1 process and 2 processes then see the same function of the batch
BASE = ("task.dropout=0", "train.epochs=2", "train.steps_per_epoch=4")
#: quantizers whose training draws independent noise per process (equal within a tolerance)
NOISY = {"diffq", "quant_noise", "quant_noise_ipq"}


def torchrun(conf: Path, root: Path, *overrides: str, nproc: int = 2, env=None, timeout: float = 240,
             wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(conf), str(root), *overrides]
    if not wait:
        return subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def _result(root: Path) -> dict:
    (folder,) = (root / "xps").iterdir()
    return json.loads((folder / "result.json").read_text())


def _quant_conf(quant: str) -> tuple:
    return (f"quant={quant}",) + (("quant.min_size=0",) if quant not in ("none",) else ())


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """One run per quantizer, all in the same two torchrun processes (one start-up for all)."""
    base = tmp_path_factory.mktemp("ddp")
    (base / "conf" / "task").mkdir(parents=True)
    (base / "conf" / "task" / "toy.yaml").write_text(TOY_YAML)
    out = torchrun(base / "conf", base / "two", *BASE, env={"DDP_QUANTS": ",".join(["none"] + CONF_QUANTS)},
                   timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return base / "two"


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none"] + CONF_QUANTS)
def test_two_processes_match_one_for_every_quantizer(compose_toy, two_process_runs, tmp_path, quant):
    overrides = BASE + _quant_conf(quant)
    single = cli.run(compose_toy(*overrides, f"paths.root={tmp_path / 'one'}"))
    states = [json.loads((two_process_runs / f"state.{quant}.rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0] == states[1], "ranks diverged"
    folder = two_process_runs / "xps" / single["sig"]  # processes are not part of the run identity
    double = json.loads((folder / "result.json").read_text())
    a, b = single["metrics"], double["metrics"]
    if quant in NOISY:  # other noise draws: the same run statistically
        assert abs(a["test_acc"] - b["test_acc"]) <= 15.0
        assert b["true_size_mb"] == pytest.approx(a["true_size_mb"], rel=0.1)
    else:
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=1.6)  # at most one of 64 flips
        assert b["true_size_mb"] == pytest.approx(a["true_size_mb"], rel=1e-6)
        assert b["valid_acc"] == pytest.approx(a["valid_acc"], abs=1.6)
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "DONE" and status["env"]["processes"] == 2
    assert not list(folder.glob("failure.rank*"))


@pytest.mark.slow
def test_accumulation_is_an_execution_detail(compose_toy, toy_conf, tmp_path):
    """2 processes x accumulation 2 == 1 process x accumulation 4 == 1 process (global batch 16)."""
    overrides = BASE + ("quant=lsq", "quant.min_size=0")
    plain = cli.run(compose_toy(*overrides, f"paths.root={tmp_path / 'a'}"))
    accum = cli.run(compose_toy(*overrides, "dist.grad_accum=4", f"paths.root={tmp_path / 'b'}"))
    assert accum["sig"] == plain["sig"]
    assert accum["metrics"]["test_acc"] == pytest.approx(plain["metrics"]["test_acc"], abs=1.6)
    out = torchrun(toy_conf, tmp_path / "c", *overrides, "dist.grad_accum=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _result(tmp_path / "c")["metrics"]["test_acc"] == pytest.approx(plain["metrics"]["test_acc"], abs=1.6)


def test_a_batch_that_does_not_split_is_a_clear_error(compose_toy):
    with pytest.raises(ValueError, match=r"task.batch_size=16 \(the global batch\) does not split into 3 equal"):
        cli.run(compose_toy("dist.grad_accum=3", "train.epochs=1"))


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_without_hanging(toy_conf, tmp_path):
    start = time.monotonic()
    out = torchrun(toy_conf, tmp_path / "f", *BASE, "dist.timeout_s=60",
                   env={"DDP_FAIL_RANK": "1", "DDP_FAIL_STEP": "3"}, timeout=180)
    assert out.returncode != 0
    assert time.monotonic() - start < 150
    (folder,) = (tmp_path / "f" / "xps").iterdir()
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "FAILED"
    assert "injected failure on rank 1" in status["traceback"], status["traceback"][-2000:]
    assert not (folder / "result.json").exists()


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_resumes_to_the_same_result(toy_conf, tmp_path):
    overrides = BASE + ("train.epochs=3", "quant=lsq", "quant.min_size=0")
    reference = torchrun(toy_conf, tmp_path / "ref", *overrides)
    assert reference.returncode == 0, reference.stderr[-3000:]
    proc = torchrun(toy_conf, tmp_path / "int", *overrides, env={"TOY_TASK_DELAY": "0.2"}, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "int").glob("xps/*/history.jsonl")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: every process of the job
    proc.communicate(timeout=120)
    (folder,) = (tmp_path / "int" / "xps").iterdir()
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "INTERRUPTED", status
    again = torchrun(toy_conf, tmp_path / "int", *overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = _result(tmp_path / "ref")["metrics"], _result(tmp_path / "int")["metrics"]
    assert b["test_acc"] == a["test_acc"] and b["true_size_mb"] == a["true_size_mb"]
    assert json.loads((folder / "status.json").read_text())["attempt"] == 2


@pytest.mark.parametrize("name, kwargs", [
    ("wikitext_mini", {}),
    ("digits", {"eval_batch_size": 7}),
])
def test_sharded_evaluation_equals_whole_evaluation_exactly(tmp_path, name, kwargs):
    task = get_task(name, **kwargs)
    task.setup(tmp_path / "data", tmp_path / "cache", "cpu")
    torch.manual_seed(0)
    model = task.build_model().eval()
    with torch.no_grad():
        whole = task.evaluate(model, "valid")
        parts: dict = {}
        for rank in range(3):
            task.eval_shard = (rank, 3)
            for key, values in task.evaluate_parts(model, "valid").items():
                parts.setdefault(key, []).extend(values)
        task.eval_shard = (0, 1)
    assert task.combine_parts(parts) == whole


def test_shard_batch_splits_nested_batches():
    batch = (torch.arange(8).reshape(4, 2), {"y": torch.arange(4)}, "tag")
    first = distributed.shard_batch(batch, 1, 2)
    assert first[0].tolist() == [[4, 5], [6, 7]] and first[1]["y"].tolist() == [2, 3] and first[2] == "tag"
    with pytest.raises(ValueError, match="multiple of processes"):
        distributed.shard_batch(batch, 0, 3)


def test_sync_bn_converts_batchnorm_and_keeps_the_state_dict():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    keys = list(model.state_dict())
    synced = distributed.sync_batchnorm(model, torch.device("cuda"))  # conversion only: no CUDA needed
    assert isinstance(synced[1], torch.nn.SyncBatchNorm) and list(synced.state_dict()) == keys


def test_sync_bn_on_cpu_is_one_clear_config_error(compose_toy, toy_conf, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"^dist.sync_bn=true needs CUDA devices \(torch's SyncBatchNorm does "
                                          r"not run on cpu\); set dist.sync_bn=false$"):
        cli.run(compose_toy("dist.sync_bn=true", "device=cpu"))


def test_shard_indices_give_each_rank_its_micro_batches():
    batch = list(range(12))
    world, accum = 2, 3
    parts = {r: shard_indices(batch, r, world, accum) for r in range(world)}
    for r in range(world):  # the loop's micro-batch k of rank r is global slice k * world + r
        for k in range(accum):
            assert parts[r][2 * k:2 * k + 2] == batch[(k * world + r) * 2:(k * world + r) * 2 + 2]
    assert sorted(parts[0] + parts[1]) == batch
    with pytest.raises(ValueError, match="multiple of processes"):
        shard_indices(list(range(10)), 0, 2, 3)


def test_image_ranks_read_only_their_part_of_each_global_batch(tmp_path):
    """Each rank decodes and augments only its images, and gets exactly the pixels the global
    batch would have given it (augmentation is seeded per sample, not per process)."""
    task = get_task("digits", batch_size=16, train_subset=64)
    task.setup(tmp_path / "data", tmp_path / "cache", "cpu")
    assert task.loads_own_shard()
    world, accum = 2, 2
    whole = list(task.train_batches(1))
    for rank in range(world):
        task.train_shard = (rank, world, accum)
        mine = list(task.train_batches(1))
        task.train_shard = (0, 1, 1)
        assert len(mine) == len(whole)
        for local, full in zip(mine, whole):
            assert local[0].shape[0] == 16 // world
            for k in range(accum):
                got = distributed.shard_batch(local, k, accum)
                want = distributed.shard_batch(full, k * world + rank, world * accum)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.slow
def test_torchrun_on_the_console_script_with_digits(tmp_path):
    """The contract for local launches: torchrun on `diffq-bench` itself, a real task."""
    common = ["task=digits", "quant=diffq", "train.epochs=1", "train.steps_per_epoch=3",
              f"paths.root={tmp_path / 'store'}", f"paths.data={tmp_path / 'data'}", "runtime.progress=false"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "diffq_bench.cli", *common], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (folder,) = (tmp_path / "store" / "xps").iterdir()
    assert json.loads((folder / "status.json").read_text())["state"] == "DONE"
    result = Xp.at(folder).read_result()
    assert result["metrics"]["bits_per_weight"] > 0


def test_a_normal_run_leaves_the_process_group_at_exit_a_failed_one_does_not(monkeypatch):
    """Regression: ranks that exited without leaving the gloo group together sometimes aborted at
    exit under load ('terminate called without an active exception'); a run that ended normally
    now leaves it at exit (barrier, then destroy), a failed one does not (a barrier could pair with
    a peer's pending collective)."""
    calls = []
    monkeypatch.setattr(distributed, "shutdown", lambda *a, **k: calls.append("shutdown"))
    distributed.new_run()
    distributed._leave_at_exit()
    assert calls == []
    distributed.mark_done()
    distributed._leave_at_exit()
    assert calls == ["shutdown"]
    distributed.new_run()  # the next run of the same process starts not done
    distributed._leave_at_exit()
    assert calls == ["shutdown"]


def test_shutdown_leaves_a_gloo_group(tmp_path):
    import torch.distributed as tdist
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    distributed.shutdown(barrier_timeout_s=30)
    assert not tdist.is_initialized()
    distributed.shutdown()  # no group: nothing to do
