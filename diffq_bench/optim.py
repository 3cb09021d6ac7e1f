"""Optimizers and learning-rate schedules: the ``OPTIMIZERS`` registry (``conf/optim/<name>.yaml``).

An optimizer config group holds ``name`` (a key of :data:`OPTIMIZERS`), ``lr``, ``weight_decay``,
the optimizer's own keyword arguments and two keys for the quantizer's parameters
(``quant_lr``, ``quant_separate_adam``, read by :meth:`BaseQuantizer.setup_optimizer`).
"""
from __future__ import annotations

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


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) of ``total``.

    Args:
        step: optimizer steps already done.
        total: optimizer steps of the whole run.
        warmup: linear warmup steps (from 1/warmup to 1).
        schedule: ``cosine`` (decay to ``min_ratio`` at ``total``) or ``constant``.
        min_ratio: floor of the cosine, as a fraction of the peak.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
