"""Stage 1 helpers of one-shot MPQ: distillation targets and the bit-width scheduler.

- Distillation: a sampled sub-network learns from the max-bit one. Tasks may define
  ``distill_loss(student, teacher)``; otherwise :func:`output_mse` compares the floating tensor
  leaves of the two outputs (teacher detached with :func:`detach_tree`).
- Scheduler (Tang et al. 2024): a layer whose weights sit near rounding boundaries of its lowest
  candidate ("turbulence") oscillates between levels from step to step; the most turbulent layers
  have that candidate frozen (not sampled) until the next measurement.
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn

from .base import QuantizerError


def _tensors(obj: tp.Any) -> tp.List[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def output_mse(student: tp.Any, teacher: tp.Any) -> torch.Tensor:
    """Generic distillation: mean squared error over the floating tensor leaves of the outputs."""
    pairs = list(zip(_tensors(student), _tensors(teacher)))
    if not pairs:
        raise QuantizerError("cannot distil: the model output holds no floating tensor; give the task "
                             "a distill_loss(student, teacher) method")
    return sum(nn.functional.mse_loss(s.float(), t.detach().float()) for s, t in pairs) / len(pairs)


def detach_tree(obj: tp.Any) -> tp.Any:
    """``obj`` with every tensor detached (tensors, dicts, lists, tuples, named tuples)."""
    if torch.is_tensor(obj):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: detach_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if hasattr(obj, "_fields"):
            return type(obj)(*map(detach_tree, obj))
        return type(obj)(detach_tree(v) for v in obj)
    return obj


def turbulence(weights: tp.Sequence[torch.Tensor], steps: tp.Sequence[torch.Tensor], eps: float) -> float:
    """Share of the weights within ``eps`` steps of a rounding boundary (half-integer of w/s).

    Args:
        weights: a layer's quantized weight tensors.
        steps: the step size of each, at the bit width under study.
        eps: the distance, in steps, counted as turbulent (0..0.5).
    """
    near, total = 0, 0
    with torch.no_grad():
        for weight, step in zip(weights, steps):
            scaled = weight.detach().float() / step.detach().clamp_min(1e-8)
            frac = scaled - torch.floor(scaled)
            near += int(((frac - 0.5).abs() < eps).sum())
            total += weight.numel()
    return near / max(1, total)


def most_turbulent(scores: tp.Dict[str, float], frac: float) -> tp.List[str]:
    """The ``ceil(frac · n)`` layers of highest score (ties keep the given order)."""
    ranked = sorted(scores, key=lambda n: -scores[n])
    return ranked[:int(math.ceil(frac * len(ranked)))]
