"""The one range check of every numeric option (config keys, quantizer and task arguments,
launcher settings); each caller picks the error type its users expect."""
from __future__ import annotations

import math
import typing as tp

Number = tp.Union[int, float]


def check_number(name: str, value: tp.Any, low: float = -math.inf, high: float = math.inf, *,
                 integer: bool = False, error: tp.Type[Exception] = ValueError) -> Number:
    """``value`` if it is a finite number (not a bool, NaN or inf) in ``[low, high]``, integral if
    asked.

    Args:
        name: the option's name as the user spells it (``lambda``, ``quant.bits``...).
        value: the value to check.
        low: smallest accepted value.
        high: largest accepted value.
        integer: also require an integral value.
        error: the exception raised, with ``"<name> must be <kind> <range>, got <value>"``.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer and int(value) != value:
        ok = False
    if not ok or not low <= value <= high:
        kind = "an integer" if integer else "a finite number"
        bound = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise error(f"{name} must be {kind} {bound}, got {value!r}")
    return value
