"""Checkpoint files: atomic ``torch.save`` of plain tensors/dicts, ``weights_only`` loading, RNG state.

A checkpoint holds everything a resumed run needs to continue bit for bit: model, optimizers,
quantizer state, RNG states (torch CPU/CUDA, Python, NumPy), epoch, step, history, best metric,
cumulative wall time. Only tensors, numbers, strings, lists and dicts are stored, so it loads
with ``torch.load(weights_only=True)`` (no code is ever unpickled).
"""
from __future__ import annotations

import os
import random
import typing as tp
from pathlib import Path

import numpy as np
import torch

FORMAT = "diffq-bench/checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not match the run; the message names the file."""


def save(state: tp.Dict[str, tp.Any], path: tp.Union[str, Path]) -> None:
    """Write ``state`` atomically: a reader sees the old file or the new one, never half of one.

    Args:
        state: tensors / numbers / strings / lists / dicts only.
        path: destination file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fout:
        torch.save({"format": FORMAT, "version": VERSION, **state}, fout)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, path)


def load(path: tp.Union[str, Path]) -> tp.Dict[str, tp.Any]:
    """Read a checkpoint written by :func:`save` (``weights_only=True``, on CPU).

    Raises:
        CheckpointError: unreadable, truncated or foreign file (the message says how to recover).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is one clear error
        # torch's own message suggests weights_only=False, which we never do: keep its first line.
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {reason}); "
                              f"delete it to restart this run from scratch") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a diffq-bench checkpoint (missing format marker)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, "
                              f"this diffq-bench reads up to {VERSION}")
    return state


def rng_state() -> tp.Dict[str, tp.Any]:
    """All random generator states the training loop consumes, weights_only-safe."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: tp.Dict[str, tp.Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed every generator the loop and the tasks may use."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
