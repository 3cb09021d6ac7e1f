"""The exported quantized state: its format marker, (de)serialization and loading into a model.

An export is a plain dict (tensors, numbers, strings) that ``torch.load(weights_only=True)`` reads
back, so restoring never unpickles code. Keys: ``format`` (:data:`FORMAT_NAME`), ``version``
(:data:`FORMAT_VERSION`), ``method``, ``config``, ``quantized`` (name -> packed entry), ``float``
(name -> tensor) and ``tied`` (name -> name of the first occurrence).
"""
from __future__ import annotations

import io
import typing as tp
from pathlib import Path

import torch
from torch import nn

from ..io import load_torch, write_bytes
from .errors import QuantizerError
from .pack import unpack_uint

FORMAT_NAME = "diffq-bench/quantized-state"
FORMAT_VERSION = 1

#: rebuilds one dequantized weight from its packed entry, shaped and typed like the target.
RestoreParam = tp.Callable[[tp.Dict[str, tp.Any], torch.Tensor], torch.Tensor]


def make_state(method: str, config: tp.Dict[str, tp.Any], quantized: tp.Dict[str, tp.Any],
               floats: tp.Dict[str, torch.Tensor], tied: tp.Dict[str, str]) -> tp.Dict[str, tp.Any]:
    """Assemble an exported state with the current format marker and version.

    Args:
        method: the quantizer's registry name (what :func:`diffq_bench.quant.restore` dispatches on).
        config: the quantizer's constructor arguments (JSON-able).
        quantized: parameter name -> packed entry.
        floats: parameter name -> tensor kept in float.
        tied: tied parameter name -> name of its first occurrence.
    """
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "method": method,
            "config": config, "quantized": quantized, "float": floats, "tied": tied}


def serialize(state: tp.Dict[str, tp.Any]) -> bytes:
    """Serialize an exported state with ``torch.save`` (data only: no code is pickled).

    Args:
        state: an exported state.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save(path: tp.Union[str, Path], state: tp.Dict[str, tp.Any]) -> None:
    """Write an exported state to ``path`` atomically (its size is :meth:`true_size_bytes`)."""
    write_bytes(path, serialize(state))


def load(path: tp.Union[str, Path]) -> tp.Dict[str, tp.Any]:
    """Read a state written by :func:`save` (``weights_only=True``; format and version checked).

    Raises:
        FileNotFoundError: no file at ``path``.
        diffq_bench.io.LoadError: unreadable or unsafe file, not a quantized state, newer version.
    """
    return load_torch(path, what="quantized state", marker=FORMAT_NAME, version=FORMAT_VERSION)


def deserialize(data: bytes) -> tp.Dict[str, tp.Any]:
    """Inverse of :func:`serialize`, with ``weights_only=True`` (never unpickles code).

    Args:
        data: bytes written by :func:`serialize`.
    Raises:
        diffq_bench.io.LoadError: unreadable or unsafe data, no format marker, or a newer version.
    """
    return load_torch(data, what="quantized state", marker=FORMAT_NAME, version=FORMAT_VERSION)


def load_weights(model: nn.Module, state: tp.Dict[str, tp.Any],
                 restore_param: RestoreParam) -> nn.Module:
    """Write the dequantized weights of ``state`` into ``model`` (in place) and return it.

    Every check runs before the first parameter it concerns is written: the model must have no
    parameter the state lacks, and names and shapes must match.

    Args:
        model: the model to load into.
        state: an exported state.
        restore_param: the method's rebuild of one weight from its ``quantized`` entry.
    Raises:
        QuantizerError: the state does not fit the model's architecture.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    covered = (set(state.get("quantized", {})) | set(state.get("float", {}))
               | set(state.get("tied", {})))
    missing = sorted(set(params) - covered)
    if missing:
        raise QuantizerError(f"model has {len(missing)} parameter(s) the quantized state lacks "
                             f"(e.g. {missing[:3]}): wrong model architecture for this state")
    for section in ("quantized", "float"):
        for name, entry in state.get(section, {}).items():
            if name not in params:
                raise QuantizerError(f"quantized state has parameter {name!r} that the model lacks")
            target = params[name]
            shape = entry.get("shape") if section == "quantized" else list(entry.shape)
            if shape is not None and tuple(shape) != tuple(target.shape):
                raise QuantizerError(f"shape mismatch for {name!r}: state has {tuple(shape)}, "
                                     f"model has {tuple(target.shape)}")
            value = restore_param(entry, target) if section == "quantized" else entry
            if tuple(value.shape) != tuple(target.shape):
                raise QuantizerError(f"shape mismatch for {name!r}: state has {tuple(value.shape)}, "
                                     f"model has {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value.to(target.dtype))
    return model


def load_tensors(params: tp.Sequence[torch.Tensor], saved: tp.Sequence[torch.Tensor],
                 method: str) -> None:
    """Copy checkpointed quantizer tensors into the live ones, in order (used on resume).

    Args:
        params: the quantizer's learnable tensors.
        saved: the tensors saved by its ``state_dict``.
        method: the quantizer's name, shown in errors.
    Raises:
        QuantizerError: a different number of tensors, or a shape mismatch.
    """
    if len(saved) != len(params):
        raise QuantizerError(f"quantizer state holds {len(saved)} parameter(s), "
                             f"{method!r} expects {len(params)}")
    with torch.no_grad():
        for param, value in zip(params, saved):
            if tuple(param.shape) != tuple(value.shape):
                raise QuantizerError(f"quantizer state shape {tuple(value.shape)} does not "
                                     f"match {tuple(param.shape)}")
            param.copy_(value.to(param.device, param.dtype))


def unpack_entry(entry: tp.Dict[str, tp.Any], like: torch.Tensor) -> torch.Tensor:
    """The integer levels of an export entry ``{"bits", "numel", "packed", ...}`` (one bit width
    for the whole tensor), after checking it holds as many values as ``like``."""
    if entry["numel"] != like.numel():
        raise QuantizerError(f"shape mismatch: quantized entry holds {entry['numel']} values, "
                             f"parameter has {like.numel()}")
    return unpack_uint(entry["packed"], entry["bits"], entry["numel"])
