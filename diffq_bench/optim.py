"""Optimizers and learning-rate schedules: the ``OPTIMIZERS`` registry (``conf/optim/<name>.yaml``).

An optimizer config group holds ``name`` (a key of :data:`OPTIMIZERS`), ``lr``, ``weight_decay``,
the optimizer's own keyword arguments and two keys for the quantizer's parameters
(``quant_lr``, ``quant_separate_adam``, read by :meth:`BaseQuantizer.setup_optimizer`).
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp

import torch


def _adam(params, cfg, cls):
    return cls(params, lr=cfg["lr"], betas=tuple(cfg.get("betas", (0.9, 0.999))),
               eps=cfg.get("eps", 1e-8), weight_decay=cfg.get("weight_decay", 0.0))


def _sgd(params, cfg, nesterov):
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg.get("momentum", 0.0),
                           weight_decay=cfg.get("weight_decay", 0.0), nesterov=nesterov)


#: optimizer name -> builder(params, optim config dict)
OPTIMIZERS: tp.Dict[str, tp.Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, cfg: _adam(params, cfg, torch.optim.Adam),
    "adamw": lambda params, cfg: _adam(params, cfg, torch.optim.AdamW),
    "sgd": lambda params, cfg: _sgd(params, cfg, nesterov=False),
    "nag": lambda params, cfg: _sgd(params, cfg, nesterov=True),
}


#: learning-rate schedules (``train.schedule``)
SCHEDULES = ("cosine", "constant", "step", "cosine_restarts")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The multiplier of each optimizer group's peak lr at an optimizer step (``train.*`` keys).

    Attributes:
        name: ``cosine`` (one decay to ``min_lr_ratio`` at the last step), ``constant``, ``step``
            (× ``step_gamma`` every ``step_epochs`` epochs, torch's StepLR per epoch as the official
            CIFAR recipe) or ``cosine_restarts`` (fairseq's ``cosine``: periods of
            ``period_steps`` growing by ``t_mult``, the peak and floor shrunk by ``lr_shrink``
            each period).
        total: optimizer steps of the run; steps_per_epoch: optimizer steps per epoch.
        warmup_steps: linear warmup, from ``warmup_init_ratio`` to 1.
        min_lr_ratio: floor of the cosines, as a fraction of the peak.
    """
    name: str
    total: int
    steps_per_epoch: int = 1
    warmup_steps: int = 0
    warmup_init_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    step_epochs: int = 1
    step_gamma: float = 1.0
    period_steps: int = 1
    t_mult: float = 1.0
    lr_shrink: float = 1.0

    @classmethod
    def from_config(cls, train: tp.Mapping[str, tp.Any], total: int, steps_per_epoch: int) -> "Schedule":
        """The schedule a ``train`` config describes (absent keys keep their defaults)."""
        keys = {f.name for f in dataclasses.fields(cls)} - {"name", "total", "steps_per_epoch"}
        return cls(name=train["schedule"], total=total, steps_per_epoch=steps_per_epoch,
                   **{k: train[k] for k in keys if k in train})

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            r = self.warmup_init_ratio
            return r + (1 - r) * (step + 1) / self.warmup_steps
        if self.name == "constant":
            return 1.0
        if self.name == "step":
            return self.step_gamma ** ((step // max(1, self.steps_per_epoch)) // self.step_epochs)
        if self.name == "cosine_restarts":
            return self._restarts(step - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _restarts(self, current: int) -> float:
        period, mult = self.period_steps, self.t_mult
        if mult != 1:
            i = math.floor(math.log(1 - current / period * (1 - mult), mult))
            length = mult ** i * period
            start = (1 - mult ** i) / (1 - mult) * period
        else:
            i = current // period
            length, start = period, i * period
        shrink = self.lr_shrink ** i
        low, high = self.min_lr_ratio * shrink, shrink
        return low + 0.5 * (high - low) * (1 + math.cos(math.pi * (current - start) / length))
