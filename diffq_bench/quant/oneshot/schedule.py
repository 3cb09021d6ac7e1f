"""One-shot MPQ's bit-width scheduler (Tang et al. 2024).

A layer whose weights sit near rounding boundaries of its lowest candidate ("turbulence")
oscillates between levels from step to step; the most turbulent layers have that candidate frozen
(not sampled) until the next measurement.
"""
from __future__ import annotations

import math
import typing as tp

import torch


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
