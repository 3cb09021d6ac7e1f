"""The generic loop on the toy task: run folder contents, skip of finished runs, exact resume,
failures, quantizers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from diffq_bench import cli, train
from diffq_bench.config import find_conf_dir
from diffq_bench.io import LoadError
from diffq_bench.optim import Schedule
from diffq_bench.quant import deserialize
from diffq_bench.train import PREEMPT, Preempted
from diffq_bench.xp import RunLockedError, Xp

from fixtures import stable_metrics

QUANTIZED = ("diffq", "qat", "lsq")




def test_lr_factor():
    def lr_factor(step, total, warmup, name, floor):
        return Schedule(name, total, warmup_steps=warmup, min_lr_ratio=floor).factor(step)
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(70, 100, 0, "constant", 0.0) == 1.0


def test_step_schedule_is_torch_steplr_per_epoch():
    """The official CIFAR recipe: StepLR(step_size=60, gamma=0.2), stepped once per epoch."""
    sched = Schedule("step", 200 * 7, steps_per_epoch=7, step_epochs=60, step_gamma=0.2)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    steplr = torch.optim.lr_scheduler.StepLR(opt, step_size=60, gamma=0.2)
    for epoch in range(200):
        for step in range(epoch * 7, epoch * 7 + 7):
            assert sched.factor(step) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        steplr.step()


def test_cosine_restarts_is_fairseqs_cosine():
    """fairseq's cosine with warmup-init 1e-7, warmup 16k, period 270k, t-mult 2, shrink 0.75,
    min-lr 1e-4 (lr 1.0): hand values at the warmup's start/end and along the periods."""
    sched = Schedule("cosine_restarts", 10 ** 6, warmup_steps=16000, warmup_init_ratio=1e-7,
                     min_lr_ratio=1e-4, period_steps=270000, t_mult=2.0, lr_shrink=0.75)
    assert sched.factor(0) == pytest.approx(1e-7 + (1 - 1e-7) / 16000)
    assert sched.factor(15999) == pytest.approx(1.0)
    assert sched.factor(16000) == pytest.approx(1.0)                      # period 0 starts
    assert sched.factor(16000 + 135000) == pytest.approx((1 + 1e-4) / 2)  # its middle
    assert sched.factor(16000 + 270000) == pytest.approx(0.75)             # period 1, shrunk
    mid = 16000 + 270000 + 270000                                          # middle of 540k
    assert sched.factor(mid) == pytest.approx(0.75 * (1 + 1e-4) / 2)


def test_run_writes_the_run_folder(compose_toy, capsys):
    cfg = compose_toy()
    result = cli.run(cfg)
    xp = Xp(cfg.paths.root, cfg)
    names = {p.name for p in xp.folder.iterdir()}
    assert {"config.yaml", "status.json", "history.jsonl", "log.txt", "checkpoint.th", "best.th",
            "quantized.th", "result.json"} <= names
    status = json.loads(xp.status_path.read_text())
    assert status["state"] == "DONE" and status["attempt"] == 1 and status["traceback"] is None
    history = xp.read_history()
    assert [h["epoch"] for h in history] == [1, 2] and "acc" in history[0]["valid"]
    assert set(history[0]["train"]) >= {"loss", "penalty", "acc"}
    saved = json.loads(xp.result_path.read_text())
    assert saved == result and saved["metric"] == "acc" and saved["lower_is_better"] is False
    m = saved["metrics"]
    for key in ("test_acc", "valid_acc", "test_acc_subset", "test_acc_subset_restored", "true_size_mb",
                "float_size_mb", "compression", "bits_per_weight", "analytic_size_mb", "wall_time_s", "params"):
        assert key in m, key
    # the default restore check: bitwise weights, then both models on the first 8 test items
    assert m["restore_check"] == "subset" and m["restore_subset"] == 8 and "test_acc_restored" not in m
    assert m["restore_exact"] == 1.0 and m["test_acc_subset"] == m["test_acc_subset_restored"]
    assert m["params"] == 32 * 128 + 128 + 128 * 128 + 128 + 128 * 4 + 4
    state = deserialize(xp.quantized_path.read_bytes())
    assert state["method"] == "none"
    torch.load(xp.checkpoint_path, weights_only=True)
    out = capsys.readouterr().out
    assert "| test acc | size (MiB) | compression | bits/weight | wall time (s) |" in out
    assert xp.sig in out
    # the float run (quant=none) stores float32 weights: 32 bits/weight, compression 1.00x (not 0 / 0.9988)
    assert m["bits_per_weight"] == 32.0
    row = next(line for line in out.splitlines() if line.startswith(f"| {xp.sig} "))
    assert row.split(" | ")[5:7] == ["1.00×", "32.00"], row


def test_finished_run_is_not_trained_again(compose_toy, monkeypatch, capsys):
    cfg = compose_toy()
    first = cli.run(cfg)
    capsys.readouterr()

    def boom(self):
        raise AssertionError("a finished run must not train")
    monkeypatch.setattr(train.Trainer, "fit", boom)
    again = cli.run(compose_toy("train.epochs=2.0", "num_workers=3"))  # same identity
    assert again == first
    out = capsys.readouterr().out
    assert "already finished" in out and first["sig"] in out
    assert json.loads(Xp(cfg.paths.root, cfg).status_path.read_text())["attempt"] == 1


def _preempt_after(monkeypatch, task_cls, n_calls):
    calls = {"n": 0}
    original = task_cls.step

    def step(self, model, batch):
        calls["n"] += 1
        if calls["n"] == n_calls:
            PREEMPT.set()
        return original(self, model, batch)
    monkeypatch.setattr(task_cls, "step", step)
    return original


@pytest.mark.parametrize("overrides, stop_at", [
    ((), 5),                                                          # mid first epoch
    (("dist.grad_accum=2", "train.warmup_steps=3", "train.clip_grad=0.5",
      "optim=sgd", "optim.momentum=0.9", "runtime.checkpoint_every_steps=2"), 29),  # mid 2nd epoch
    (("train.epochs=3",), 24),                                        # on an epoch boundary
    (("quant=lsq", "train.ema_decay=0.9"), 17),                       # EMA weights in the state
])
def test_resume_after_preemption_is_exact(compose_toy, toy_task, monkeypatch, tmp_path, overrides, stop_at):
    reference = cli.run(compose_toy(*overrides, f"paths.root={tmp_path / 'ref'}"))
    cfg = compose_toy(*overrides, f"paths.root={tmp_path / 'resumed'}")
    original = _preempt_after(monkeypatch, toy_task, stop_at)
    with pytest.raises(Preempted):
        cli.run(cfg)
    xp = Xp(cfg.paths.root, cfg)
    assert xp.read_status()["state"] == "QUEUED" and not xp.result_path.exists()
    PREEMPT.clear()
    monkeypatch.setattr(toy_task, "step", original)
    resumed = cli.run(cfg)
    assert stable_metrics(resumed) == stable_metrics(reference)  # to the last digit
    assert xp.read_status()["attempt"] == 2
    assert xp.read_history() == [
        {k: v for k, v in h.items() if k != "time"} | {"time": h2["time"]}
        for h, h2 in zip(Xp(tmp_path / "ref", compose_toy(*overrides)).read_history(), xp.read_history())]


def test_failure_is_recorded_and_exits_nonzero(compose_toy, toy_task, toy_conf, tmp_path, monkeypatch):
    def broken(self, model, batch):
        raise RuntimeError("the toy task exploded")
    monkeypatch.setattr(toy_task, "step", broken)
    cfg = compose_toy()
    with pytest.raises(RuntimeError, match="exploded"):
        cli.run(cfg)
    status = Xp(cfg.paths.root, cfg).read_status()
    assert status["state"] == "FAILED" and "the toy task exploded" in status["traceback"]
    assert "Traceback" in status["traceback"]
    # Through the Hydra app: a single run that fails exits non-zero.
    monkeypatch.setattr("sys.argv", ["diffq-bench", f"hydra.searchpath=[file://{toy_conf}]", "task=toy",
                                     "quant=none", "runtime.progress=false",
                                     f"paths.root={tmp_path / 'app'}"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code not in (0, None)


def test_missing_data_is_a_clear_error(toy_task, toy_conf, tmp_path, monkeypatch, capsys):
    from diffq_bench.data.errors import DataMissingError

    def setup(self, data_root, *args, **kwargs):
        raise DataMissingError(f"no toy data in {data_root}/toy; run scripts/prepare_toy.sh")
    monkeypatch.setattr(toy_task, "setup", setup)
    root = tmp_path / "store"
    monkeypatch.setattr("sys.argv", ["diffq-bench", f"hydra.searchpath=[file://{toy_conf}]", "task=toy",
                                     "quant=none", f"paths.root={root}", f"paths.data={tmp_path / 'd'}"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f"diffq-bench: data missing: no toy data in {tmp_path / 'd'}/toy" in err
    (folder,) = (root / "xps").iterdir()
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "FAILED" and "DataMissingError" in status["traceback"]


def test_corrupt_checkpoint_is_a_clear_error(compose_toy):
    cfg = compose_toy()
    xp = Xp(cfg.paths.root, cfg)
    xp.create()
    xp.checkpoint_path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(LoadError, match="corrupt or unreadable.*delete .*checkpoint.th to restart") as info:
        cli.run(cfg)
    assert "weights_only" not in str(info.value)  # never torch's advice to turn the safe loader off
    assert xp.read_status()["state"] == "FAILED"


def test_locked_run_is_refused(compose_toy):
    cfg = compose_toy()
    holder = Xp(cfg.paths.root, cfg)
    holder.create()
    holder.lock()
    try:
        with pytest.raises(RunLockedError):
            cli.run(cfg)
    finally:
        holder.unlock()


CONF_QUANTS = sorted(p.stem for p in (find_conf_dir() / "quant").glob("*.yaml") if p.stem != "none")


@pytest.mark.parametrize("quant", sorted(set(QUANTIZED) | set(CONF_QUANTS)))
def test_quantized_runs(compose_toy, quant):
    """Every configured quantizer goes through the loop: train, phases, finalize, export, restore."""
    result = cli.run(compose_toy(f"quant={quant}", "train.epochs=2", "train.steps_per_epoch=3"))
    m = result["metrics"]
    assert 0 < m["bits_per_weight"] < 32 and m["compression"] > 1.0
    assert m["restore_exact"] == 1.0, (m["test_acc_subset"], m["test_acc_subset_restored"])


KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import conftest
    from diffq_bench.tasks import TASKS
    from diffq_bench import cli
    from diffq_bench.config import compose
    TASKS["toy"] = conftest.ToyTask
    cfg = compose(["hydra.searchpath=[file://{conf}]", "task=toy", "quant=none", "paths.root={root}",
                   "runtime.progress=false", "runtime.checkpoint_every_steps=1"])
    result = cli.run(cfg)
    print("SIG", result["sig"])
""")


@pytest.mark.slow
def test_resume_after_kill_is_exact(compose_toy, toy_conf, tmp_path):
    tests = str(Path(__file__).parents[1])

    def script(root):
        return KILL_SCRIPT.format(tests=tests, conf=toy_conf, root=root)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sig = cli.run(compose_toy(f"paths.root={tmp_path / 'ref'}"))["sig"]  # uninterrupted, in-process
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", script(root)], env={**env, "TOY_TASK_DELAY": "0.05"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt_path = root / "xps" / sig / "checkpoint.th"
    deadline = time.time() + 30
    while time.time() < deadline and not (ckpt_path.exists() and (root / "xps" / sig / "history.jsonl").exists()):
        time.sleep(0.05)
    time.sleep(0.3)  # die somewhere inside the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "xps" / sig / "result.json").exists()
    again = subprocess.run([sys.executable, "-c", script(root)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    a = json.loads((tmp_path / "ref" / "xps" / sig / "result.json").read_text())
    b = json.loads((root / "xps" / sig / "result.json").read_text())
    assert stable_metrics(a) == stable_metrics(b)
    assert json.loads((root / "xps" / sig / "status.json").read_text())["attempt"] == 2


@pytest.mark.parametrize("quant", ["none"] + CONF_QUANTS)
def test_resume_is_exact_for_every_quantizer(compose_toy, toy_task, monkeypatch, tmp_path, quant):
    """Quantizer state (bit logits, step sizes, phases, centroids) survives a checkpoint exactly."""
    overrides = (f"quant={quant}", "train.epochs=3", "train.steps_per_epoch=3")
    reference = cli.run(compose_toy(*overrides, f"paths.root={tmp_path / 'ref'}"))
    cfg = compose_toy(*overrides, f"paths.root={tmp_path / 'resumed'}")
    original = _preempt_after(monkeypatch, toy_task, 5)  # mid second epoch, after a phase change
    with pytest.raises(Preempted):
        cli.run(cfg)
    PREEMPT.clear()
    monkeypatch.setattr(toy_task, "step", original)
    assert stable_metrics(cli.run(cfg)) == stable_metrics(reference)


def test_best_epoch_respects_the_size_target(compose_toy):
    """demucs v2's --ms-target: an epoch is the best only if its quantized size is small enough."""
    run = ("quant=diffq", "lambda=20", "quant.min_size=0", "optim.quant_lr=0.05", "train.epochs=3")
    free = cli.run(compose_toy(*run))
    root = compose_toy().paths.root
    sizes = [h["true_size_mb"] for h in Xp(root, sig=free["sig"]).read_history()]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]  # the penalty shrinks it
    with pytest.raises(RuntimeError, match="no validated epoch was small enough.*smallest seen"):
        cli.run(compose_toy(*run, f"train.best_max_size_mb={sizes[-1] * 0.99}"))
    only_last = cli.run(compose_toy(*run, f"train.best_max_size_mb={sizes[-1]}"))
    assert only_last["metrics"]["best_epoch"] == 3


def test_gradient_value_clipping(compose_toy):
    """train.clip_grad_value clips every gradient entry: at 1e-12 SGD at lr 1 leaves the weights
    where they started."""
    from diffq_bench.checkpoint import seed_all
    from diffq_bench.tasks import TASKS
    cfg = compose_toy("optim=sgd", "optim.lr=1.0", "optim.momentum=0", "optim.weight_decay=0",
                      "train.clip_grad_value=1e-12", "train.epochs=1")
    cli.run(cfg)
    seed_all(0)
    start = TASKS["toy"]().build_model().state_dict()
    best = torch.load(Xp(cfg.paths.root, cfg).best_path, weights_only=True)["model"]
    assert max(float((best[k] - v).abs().max()) for k, v in start.items()) < 1e-9


def test_ema_weights_are_validated_and_exported(compose_toy, toy_task):
    cfg = compose_toy("train.ema_decay=0.9", "train.epochs=1")
    cli.run(cfg)
    xp = Xp(cfg.paths.root, cfg)
    trained = torch.load(xp.checkpoint_path, weights_only=True)
    best = torch.load(xp.best_path, weights_only=True)["model"]
    names = [n for n, _ in toy_task().build_model().named_parameters()]
    shadow = dict(zip(names, trained["ema"]))
    assert all(torch.equal(best[n], shadow[n]) for n in names)  # the best state is the average
    assert any(not torch.equal(best[n], trained["model"][n]) for n in names)  # not the last step
