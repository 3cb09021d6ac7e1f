"""Shared fixtures: a tiny test-only task registered into TASKS, config composition helpers."""
from __future__ import annotations

import os
import time
import typing as tp
from pathlib import Path

import pytest
import torch
from torch import nn

from diffq_bench.tasks import TASKS, Task

from fixtures import TOY_YAML  # noqa: F401 - re-exported: tests import it from here too

torch.set_num_threads(1)


class ToyTask(Task):
    """Synthetic 4-class classification with an MLP: small, but exercises every loop feature.

    Batches are shuffled with the *global* torch RNG when an epoch's batches are built and the
    model has dropout, so exact resume is only possible if the loop restores the RNG states.
    """
    name = "toy"
    metric = "acc"
    lower_is_better = False

    def __init__(self, n_train: int = 192, batch_size: int = 16, hidden: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n_train, self.batch_size, self.hidden, self.dropout = n_train, batch_size, hidden, dropout
        self.eval_subset = 0  # as a real task's (not a config key here): the first N items (0: all)
        # Seconds of sleep per step (not a kwarg: it must not change the run identity), so a test
        # can kill a run in the middle of training.
        self.delay = float(os.environ.get("TOY_TASK_DELAY", "0"))
        # TOY_TASK_HOLD=<steps>:<file>: after that many steps of this process, a step waits while
        # the file exists (or until a preemption signal), so a test holds a run in training
        # instead of racing it.
        hold = os.environ.get("TOY_TASK_HOLD", "")
        self.hold_after, _, self.hold_file = hold.partition(":") if hold else (0, "", "")
        self.hold_after, self.steps_done = int(self.hold_after or 0), 0

    def setup(self, data_root, cache_dir, device, num_workers=0, seed=0):
        super().setup(data_root, cache_dir, device, num_workers, seed)
        gen = torch.Generator().manual_seed(1234 + seed)
        proj = torch.randn(32, 4, generator=gen)
        self.data = {}
        for split, n in (("train", self.n_train), ("valid", 64), ("test", 64)):
            x = torch.randn(n, 32, generator=gen)
            self.data[split] = (x, (x @ proj).argmax(-1))

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(32, self.hidden), nn.ReLU(), nn.Dropout(self.dropout),
                             nn.Linear(self.hidden, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 4))

    def train_batches(self, epoch: int) -> tp.List[tp.Tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.data["train"]
        perm = torch.randperm(len(x))
        return [(x[perm[i:i + self.batch_size]], y[perm[i:i + self.batch_size]])
                for i in range(0, len(x) - self.batch_size + 1, self.batch_size)]

    def step(self, model, batch):
        if self.delay:
            time.sleep(self.delay)
        if self.hold_file and self.steps_done >= self.hold_after:
            from diffq_bench.train import PREEMPT
            while os.path.exists(self.hold_file) and not PREEMPT.is_set():
                time.sleep(0.05)
        self.steps_done += 1
        x, y = batch
        logits = model(x.to(self.device))
        loss = nn.functional.cross_entropy(logits, y.to(self.device))
        return loss, {"acc": float((logits.argmax(-1) == y).float().mean())}

    def evaluate(self, model, split):
        x, y = self.data[split]
        if self.eval_subset:
            x, y = x[:self.eval_subset], y[:self.eval_subset]
        logits = model(x.to(self.device))
        return {"loss": float(nn.functional.cross_entropy(logits, y)),
                "acc": float((logits.argmax(-1) == y).float().mean())}


@pytest.fixture
def toy_task(monkeypatch):
    """Register :class:`ToyTask` as ``toy`` for the duration of a test."""
    monkeypatch.setitem(TASKS, "toy", ToyTask)
    return ToyTask


@pytest.fixture
def toy_conf(tmp_path: Path) -> Path:
    """A config search-path folder holding ``task/toy.yaml``."""
    folder = tmp_path / "toyconf"
    (folder / "task").mkdir(parents=True)
    (folder / "task" / "toy.yaml").write_text(TOY_YAML)
    return folder


@pytest.fixture
def compose_toy(toy_task, toy_conf, tmp_path):
    """``compose_toy(*overrides)`` -> config of a toy run whose store is under tmp_path."""
    from diffq_bench.config import compose

    def _compose(*overrides: str):
        return compose([f"hydra.searchpath=[file://{toy_conf}]", "task=toy", "quant=none",
                        f"paths.root={tmp_path / 'outputs'}", "runtime.progress=false",
                        *overrides])
    return _compose
