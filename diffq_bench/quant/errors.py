"""The quantizer library's error and the argument/state checks every method shares.

At the bottom of the package (no first-party import), so the low-level modules (state format,
packing) raise the same error as the quantizers without importing the base class.
"""
from __future__ import annotations

import torch

from ..checks import check_number


class QuantizerError(ValueError):
    """Bad quantizer argument or state: the message says what was wrong and the valid range."""


def check_range(name: str, value: float, low: float, high: float, integer: bool = False) -> None:
    """Raise :class:`QuantizerError` unless ``low <= value <= high`` (and integral if asked).

    Args:
        name: argument name shown in the message.
        value: the value to check (bools and NaN are rejected).
        low: smallest accepted value.
        high: largest accepted value.
        integer: also require an integral value.
    """
    check_number(name, value, low, high, integer=integer, error=QuantizerError)


def check_finite(name: str, tensor: torch.Tensor, what: str = "parameter") -> None:
    """Raise a clear error naming ``name`` when ``tensor`` holds NaN or inf.

    Args:
        name: tensor name shown in the message.
        tensor: the tensor to check.
        what: kind of tensor shown in the message ("weight", "LSQ step"...).
    """
    # One vectorized reduction first: any NaN/inf makes the sum non-finite; only then (or on
    # an overflow of the sum) pay for the elementwise check that counts the bad entries.
    if tensor.numel() and bool(torch.isfinite(tensor.detach().sum())):
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise QuantizerError(f"{what} {name!r} holds {bad} non-finite value(s) (NaN/inf); "
                             "the run diverged or the checkpoint is corrupt")
