"""The float reference of a quantized run: the same task and recipe with ``quant=none``, looked up
in the run store, so a finished run can say "7.2x smaller for +5.5 PPL" next to its row.

The reference is, in order: the parent of ``init=run:...`` when that parent is a float run (the
model the quantized run was fine-tuned from), else the run composed from the same command-line
overrides minus everything quantizer-specific (``quant=``, ``quant.*``, ``lambda``, ``group_size``,
``optim.quant_lr``, ``optim.quant_separate_adam``, ``init``) plus ``quant=none``. Only a DONE run
counts; nothing is trained here.
"""
from __future__ import annotations

import typing as tp

from .. import init
from ..config import compose
from ..xp import Xp, parent_config

#: override keys that only concern the quantizer (dropped to name the float run)
QUANT_KEYS = ("quant", "lambda", "group_size", "optim.quant_lr", "optim.quant_separate_adam", "init")
#: override keys that are not part of a run's identity, kept out of the suggested command
EXECUTION_KEYS = ("paths", "device", "num_workers", "dist", "runtime", "hydra")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _under(key: str, roots: tp.Sequence[str]) -> bool:
    return any(key == root or key.startswith(root + ".") or key.startswith(root + "/") for root in roots)


def float_overrides(overrides: tp.Sequence[str]) -> tp.List[str]:
    """The command-line overrides of the float run matching a quantized run's ``overrides``."""
    return [o for o in overrides if not _under(_key(o), QUANT_KEYS)] + ["quant=none"]


def find_float_reference(plain: tp.Mapping[str, tp.Any], overrides: tp.Sequence[str]
                         ) -> tp.Tuple[tp.List[str], tp.Optional[tp.Dict[str, tp.Any]]]:
    """The float run of a quantized run: (its overrides, its result.json or None if not DONE).

    Args:
        plain: the quantized run's resolved config.
        overrides: the command-line overrides the quantized run was composed from.
    """
    root = plain["paths"]["root"]
    spec = init.parse(plain.get("init"))
    if spec is not None and spec.is_run:
        parent = parent_config(plain, spec)
        if parent["quant"]["name"] == "none":
            xp = Xp(root, parent)
            return list(spec.overrides), xp.read_result() if xp.is_done() else None
    wanted = float_overrides(overrides)
    context = [f"paths.{k}={plain['paths'][k]}" for k in ("root", "data", "cache") if k in plain["paths"]]
    extra = [o for o in wanted if not _under(_key(o), ("paths",))]
    xp = Xp(root, compose(extra + context))
    return wanted, xp.read_result() if xp.is_done() else None


def reference_line(result: tp.Mapping[str, tp.Any], plain: tp.Mapping[str, tp.Any],
                   overrides: tp.Sequence[str]) -> tp.Optional[str]:
    """One line comparing a finished quantized run with its float reference (None for a float run).

    Example: ``float reference (run 1a2b3c4d5e6f): test ppl 237.3, 3.26 MiB -> this run is 7.21x
    smaller, test ppl +5.5``; when the float run is not in the store, the command that makes it.
    """
    if plain["quant"]["name"] == "none":
        return None
    try:
        wanted, ref = find_float_reference(plain, overrides)
    except Exception as exc:  # noqa: BLE001 - a courtesy line must never fail a finished run
        return f"float reference: not looked up ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if ref is None:
        shown = " ".join(o for o in wanted if not _under(_key(o), EXECUTION_KEYS) or _key(o) == "paths.root")
        return f"float reference: not in the run store yet (diffq-bench {shown} makes it)"
    metric = str(result["metric"])
    name = f"test_{metric}"
    mine, theirs = result["metrics"].get(name), ref["metrics"].get(name)
    size_mine, size_ref = result["metrics"].get("true_size_mb"), ref["metrics"].get("true_size_mb")
    if None in (mine, theirs, size_mine, size_ref) or not size_mine:
        return f"float reference (run {ref['sig']}): its result lacks {name} or true_size_mb"
    return (f"float reference (run {ref['sig']}): test {metric} {theirs:#.4g}, {size_ref:.4g} MiB file -> "
            f"this run's file is {size_ref / size_mine:.2f}× smaller, test {metric} {mine - theirs:+.3g}")
