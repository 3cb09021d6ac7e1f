"""Checkpoint files: atomic ``torch.save`` of plain tensors/dicts, ``weights_only`` loading, RNG state.

A checkpoint holds everything a resumed run needs to continue bit for bit: model, optimizers,
quantizer state, RNG states (torch CPU/CUDA, Python, NumPy), epoch, step, history, best metric,
cumulative wall time. Only tensors, numbers, strings, lists and dicts are stored, so it loads
with ``torch.load(weights_only=True)`` (no code is ever unpickled).
"""
from __future__ import annotations

import random
import typing as tp
from pathlib import Path

import numpy as np
import torch

from . import io

FORMAT = "diffq-bench/checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A readable checkpoint does not fit the run (another run's, other optimizers...)."""


def save(state: tp.Dict[str, tp.Any], path: tp.Union[str, Path]) -> None:
    """Write ``state`` atomically (:func:`diffq_bench.io.save_torch`) with the format marker.

    Args:
        state: tensors / numbers / strings / lists / dicts only.
        path: destination file.
    """
    io.save_torch(path, {"format": FORMAT, "version": VERSION, **state})


def load(path: tp.Union[str, Path], recover: str = "delete it to restart this run from scratch"
         ) -> tp.Dict[str, tp.Any]:
    """Read a checkpoint written by :func:`save` (``weights_only=True``, on CPU).

    Args:
        path: the checkpoint file.
        recover: what the user can do when the file is corrupt (part of the error message).
    Raises:
        diffq_bench.io.LoadError: unreadable, truncated, unsafe or foreign file.
    """
    return io.load_torch(path, what="checkpoint", marker=FORMAT, version=VERSION, recover=recover)


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
