"""Checkpoint files: atomic ``torch.save`` of plain tensors/dicts, ``weights_only`` loading, RNG state.

A checkpoint holds everything a resumed run needs to continue bit for bit: model, optimizers,
quantizer state, RNG states (torch CPU/CUDA, Python, NumPy), epoch, step, history, best metric,
cumulative wall time. Only tensors, numbers, strings, lists and dicts are stored, so it loads
with ``torch.load(weights_only=True)`` (no code is ever unpickled).
"""
from __future__ import annotations

import contextlib
import random
import typing as tp
from pathlib import Path

import numpy as np
import torch

from . import io

FORMAT = "diffq-bench/checkpoint"
VERSION = 1


class CheckpointError(io.LoadError, RuntimeError):
    """A readable checkpoint does not fit the run (another run's, other optimizers, missing or
    malformed entries...). The message names the file and says to delete it."""


#: what a resumed run needs from checkpoint.th, with the type of each entry
TRAINER_KEYS: tp.Dict[str, tp.Tuple[type, ...]] = {
    "model": (dict,), "quantizer": (dict,), "optimizers": (list,), "rng": (dict,),
    "epoch_rng": (dict, type(None)), "epoch": (int,), "step_in_epoch": (int,), "global_step": (int,),
    "history": (list,), "best": (dict,), "wall_time": (int, float), "sums": (dict,), "count": (int,),
}


def restart_advice(path: tp.Union[str, Path]) -> str:
    """The fix for a checkpoint that cannot be resumed (it works: without checkpoint.th the run
    trains again from its first epoch)."""
    return f"delete {path} to restart the run from scratch"


def check_trainer_state(state: tp.Mapping[str, tp.Any], path: tp.Union[str, Path]) -> None:
    """Check that a loaded checkpoint has every entry a resume needs, of the right type and size.

    Raises:
        CheckpointError: naming ``path``, the first wrong entry and the fix.
    """
    problem = None
    for key, types in TRAINER_KEYS.items():
        if key not in state:
            problem = f"has no {key!r} entry"
        elif not isinstance(state[key], types) or isinstance(state[key], bool):
            problem = f"has a {type(state[key]).__name__} as {key!r}"
        if problem:
            break
    if problem is None:
        problem = _rng_problem(state["rng"], "rng") or (
            _rng_problem(state["epoch_rng"], "epoch_rng") if state["epoch_rng"] is not None else None)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}: it was not written by this version of "
                              f"diffq-bench's training loop, or is damaged; {restart_advice(path)}")


def _rng_problem(state: tp.Any, key: str) -> tp.Optional[str]:
    """Why ``state`` is not an :func:`rng_state` (None when it is one)."""
    try:
        ok = (isinstance(state["torch"], torch.Tensor) and state["torch"].dtype == torch.uint8
              and state["torch"].numel() == torch.get_rng_state().numel()
              and len(state["python"]) == 3 and len(state["python"][1]) == 625
              and len(state["numpy"]) == 5 and state["numpy"][1].numel() == 624)
    except (KeyError, TypeError, AttributeError, IndexError):
        ok = False
    return None if ok else f"has a malformed random generator state {key!r}"


@contextlib.contextmanager
def restoring(path: tp.Union[str, Path]) -> tp.Iterator[None]:
    """Turn a failure to put a checkpoint's entries back (state dicts of another shape, optimizer
    groups that differ...) into one :class:`CheckpointError` naming ``path`` and the fix."""
    try:
        yield
    except io.LoadError:
        raise
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} does not fit this run ({type(exc).__name__}: {first}); "
                              f"{restart_advice(path)}") from exc


def save(state: tp.Dict[str, tp.Any], path: tp.Union[str, Path]) -> None:
    """Write ``state`` atomically (:func:`diffq_bench.io.save_torch`) with the format marker.

    Args:
        state: tensors / numbers / strings / lists / dicts only.
        path: destination file.
    """
    io.save_torch(path, {"format": FORMAT, "version": VERSION, **state})


def load(path: tp.Union[str, Path], recover: tp.Optional[str] = None) -> tp.Dict[str, tp.Any]:
    """Read a checkpoint written by :func:`save` (``weights_only=True``, on CPU).

    Args:
        path: the checkpoint file.
        recover: what the user can do when the file is corrupt (part of the error message;
            default :func:`restart_advice`).
    Raises:
        diffq_bench.io.LoadError: unreadable, truncated, unsafe or foreign file.
    """
    return io.load_torch(path, what="checkpoint", marker=FORMAT, version=VERSION,
                         recover=restart_advice(path) if recover is None else recover)


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
