"""The task contract: one benchmark = data + model + loss/metrics + the paper's evaluation.

The training loop (:mod:`diffq_bench.train`) only ever talks to a task through this class, so it
never branches on a task name. A task is built from its config group (``conf/task/<name>.yaml``):
the group's keys are exactly the constructor's keyword arguments (a test checks this).
"""
from __future__ import annotations

import typing as tp
from pathlib import Path

import torch
from torch import nn


class Task:
    """Base class of every benchmark.

    Class attributes:
        name: registry key (``TASKS[name]``).
        metric: key of the paper's metric in :meth:`evaluate`'s dict (``ppl``, ``top1``, ``nsdr``).
        lower_is_better: direction of ``metric`` (best checkpoint selection, Pareto fronts).

    Instance attributes set by the runner before use:
        device: ``torch.device`` the model and batches live on.
        data_root: folder with the dataset (official layout), or where embedded data is written.
        cache_dir: folder for derived caches (tokenized tensors...).
    """
    name: str = "base"
    metric: str = "loss"
    lower_is_better: bool = True

    def __init__(self, **kwargs: tp.Any):
        self.device = torch.device("cpu")
        self.data_root: Path = Path(".")
        self.cache_dir: Path = Path(".cache")

    def setup(self, data_root: tp.Union[str, Path], cache_dir: tp.Union[str, Path],
              device: tp.Union[str, torch.device], num_workers: int = 0, seed: int = 0) -> None:
        """Locate (or build, for embedded sets) the data; raise :class:`DataMissingError` if absent."""
        self.data_root = Path(data_root)
        self.cache_dir = Path(cache_dir)
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.seed = seed

    def build_model(self) -> nn.Module:
        """A freshly initialised model (no pretrained download, ever)."""
        raise NotImplementedError

    def train_batches(self, epoch: int) -> tp.Iterable[tp.Any]:
        """The batches of one training epoch (deterministic given ``seed`` and ``epoch``)."""
        raise NotImplementedError

    def step(self, model: nn.Module, batch: tp.Any) -> tp.Tuple[torch.Tensor, tp.Dict[str, float]]:
        """One forward on a training batch: (loss to minimise, flat dict of float metrics)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str) -> tp.Dict[str, float]:
        """The paper's evaluation on ``split`` (``valid`` or ``test``); includes :attr:`metric`."""
        raise NotImplementedError

    # ---------------------------------------------------------------- optional hooks
    def num_train_batches(self) -> tp.Optional[int]:
        """Batches per training epoch when :meth:`train_batches` yields from a generator
        (None: the loop takes ``len(train_batches(0))``)."""
        return None

    #: ``distill_loss(student_output, teacher_output) -> Tensor``: how a quantized sub-network
    #: learns from the full-precision one (one-shot MPQ); None: the mean squared error between
    #: the floating tensors of the two outputs.
    distill_loss: tp.Optional[tp.Callable[[tp.Any, tp.Any], torch.Tensor]] = None
