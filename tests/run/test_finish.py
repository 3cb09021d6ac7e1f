"""The restore check at the end of a run (diffq_bench/finish.py, issue 17): the exported file must
reproduce the evaluated model, proved by bitwise equal tensors plus the metric on a test subset
(a second full test pass only when finish.restore_check=full)."""
from __future__ import annotations

import json

import pytest
import torch

from diffq_bench import cli, finish
from diffq_bench.config import ConfigError, compose, validate
from diffq_bench.quant import QUANTIZERS, get_quantizer, restore
from diffq_bench.xp import Xp


def _spy_test_evaluations(monkeypatch, toy_task):
    """Records ``eval_subset`` at every evaluation of the test split."""
    seen = []
    original = toy_task.evaluate

    def evaluate(self, model, split):
        if split == "test":
            seen.append(self.eval_subset)
        return original(self, model, split)

    monkeypatch.setattr(toy_task, "evaluate", evaluate)
    return seen


def test_subset_check_is_one_full_test_pass_plus_two_small_ones(compose_toy, toy_task, monkeypatch):
    seen = _spy_test_evaluations(monkeypatch, toy_task)
    m = cli.run(compose_toy("quant=diffq", "train.epochs=1", "train.steps_per_epoch=2"))["metrics"]
    # the reported test (whole set), then the evaluated and the restored model on 8 items;
    # before: the whole test set twice
    assert seen == [0, 8, 8]
    assert m["restore_check"] == "subset" and m["restore_subset"] == 8 and m["restore_exact"] == 1.0
    assert m["test_acc_subset"] == m["test_acc_subset_restored"] and "test_acc_restored" not in m
    assert 0 <= m["test_acc_subset"] <= 1


def test_full_check_still_runs_the_whole_test_set_and_keeps_the_run_identity(compose_toy, toy_task,
                                                                             monkeypatch):
    seen = _spy_test_evaluations(monkeypatch, toy_task)
    cfg = compose_toy("quant=diffq", "train.epochs=1", "train.steps_per_epoch=2", "finish.restore_check=full")
    m = cli.run(cfg)["metrics"]
    assert seen == [0, 0]
    assert m["restore_check"] == "full" and m["restore_exact"] == 1.0 and m["test_acc_restored"] == m["test_acc"]
    assert "test_acc_subset" not in m and "restore_subset" not in m
    # an evaluation-only key: the same run as with the default check (finish is not hashed)
    default = compose_toy("quant=diffq", "train.epochs=1", "train.steps_per_epoch=2")
    assert Xp(cfg.paths.root, cfg).sig == Xp(default.paths.root, default).sig


def test_a_debug_runs_smaller_eval_subset_is_kept(compose_toy, toy_task, monkeypatch):
    seen = _spy_test_evaluations(monkeypatch, toy_task)
    original_init = toy_task.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.eval_subset = 5

    monkeypatch.setattr(toy_task, "__init__", init)
    m = cli.run(compose_toy("train.epochs=1", "train.steps_per_epoch=2"))["metrics"]
    assert seen == [5, 5, 5] and m["restore_subset"] == 5


def test_a_tampered_export_ends_the_run_failed_naming_the_tensor(compose_toy, monkeypatch):
    real = finish.deserialize

    def tampered(data):
        state = real(data)
        state["quantized"]["3.weight"]["levels"][0] ^= 1  # one bit of one level of the middle layer
        return state

    monkeypatch.setattr(finish, "deserialize", tampered)
    cfg = compose_toy("quant=diffq", "train.epochs=1", "train.steps_per_epoch=2")
    with pytest.raises(finish.RestoreMismatch, match=r"restored weight '3\.weight': 1 of 16384 entries differ"):
        cli.run(cfg)
    xp = Xp(cfg.paths.root, cfg)
    status = json.loads(xp.status_path.read_text())
    assert status["state"] == "FAILED" and "RestoreMismatch" in status["traceback"]
    assert not xp.result_path.exists()


def test_a_restored_buffer_that_differs_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    quantizer = get_quantizer("none", model)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    restore(fresh, quantizer.export())
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}
    assert finish.check_restored(fresh, quantizer.eval_weights(), buffers) == 7  # 4 params, 3 buffers
    buffers["1.running_var"] = buffers["1.running_var"] + 1
    with pytest.raises(finish.RestoreMismatch, match=r"restored buffer '1\.running_var': 4 of 4"):
        finish.check_restored(fresh, quantizer.eval_weights(), buffers)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_every_quantizers_restore_passes_the_bitwise_check(name):
    # eval_weights() is what the check compares with: for every method, a restored export equals it
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Conv1d(8, 8, 3, padding=1), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6, 5))
    quantizer = get_quantizer(name, model, min_size=0)
    x = torch.randn(4, 4, 6)
    model(x).sum().backward()  # methods with activation ranges calibrate on a train forward
    model.eval()
    with torch.no_grad():
        expected = model(x)
    fresh = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Conv1d(8, 8, 3, padding=1), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6, 5)).eval()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        for n, b in fresh.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
    state = quantizer.export()
    weights = quantizer.eval_weights()
    quantizer.detach()
    restore(fresh, state)
    assert finish.check_restored(fresh, weights, buffers) > 0
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("override,match", [
    ("finish.restore_check=half", "finish.restore_check must be subset or full"),
    ("finish.restore_subset=0", "finish.restore_subset"),
])
def test_bad_finish_options_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose([override]))
