"""Packed export of a one-shot MPQ configuration and its restore into a plain model.

The export holds, for the chosen configuration, each quantized weight's LSQ levels at its bit width
and step (the same values the eval forward computes with), the active BatchNorm copies under the
plain model's names (parameters and running statistics), the input quantizers of the quantized
layers and the configuration itself. Restoring it into a freshly built plain model reproduces the
eval outputs bit for bit.
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn

from ..actquant import install_restored_activations, lsq_dequantize, lsq_levels
from ..errors import QuantizerError
from ..pack import pack_uint
from ..state import unpack_entry
from . import bnpairs

Config = tp.Dict[str, tp.Tuple[int, int]]


def pack_weight(weight: torch.Tensor, step: torch.Tensor, bits: int) -> tp.Dict[str, tp.Any]:
    """Export entry of one weight at ``bits`` with LSQ step ``step`` (signed levels, packed)."""
    levels = lsq_levels(weight, step, bits, True)  # unsigned: signed level + 2**(bits-1)
    return {"bits": bits, "numel": weight.numel(), "packed": pack_uint(levels.cpu(), bits),
            "step": float(step.detach().float().clamp_min(1e-8))}  # exact float32 value


def unpack_weight(entry: tp.Dict[str, tp.Any], like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_weight`, shaped like ``like``."""
    levels = unpack_entry(entry, like)
    step = torch.as_tensor(entry["step"], dtype=torch.float32)
    return lsq_dequantize(levels, step, entry["bits"], True).reshape(like.shape)


def add_configuration(state: tp.Dict[str, tp.Any], model: nn.Module, bn_containers: tp.Iterable[str],
                      float16: bool, activations: tp.Dict[str, tp.Dict[str, tp.Any]],
                      config: Config) -> tp.Dict[str, tp.Any]:
    """Complete the base export ``state`` of a supernet with what its configuration needs.

    Args:
        state: the export of the weights (``BaseQuantizer.export``), modified in place.
        model: the supernet (its BN-pair containers are read for their active copies).
        bn_containers: names of the :class:`~.bnpairs.SwitchableBN` containers.
        float16: store the BN parameters as float16.
        activations: layer -> input quantizer entry (``{"kind": "lsq", ...}``).
        config: the exported configuration (layer -> (weight bits, input bits)).
    """
    prefixes = tuple(f"{name}." for name in bn_containers)
    floats = {k: v for k, v in state["float"].items() if not k.startswith(prefixes)}
    bn_params, bn_buffers = bnpairs.active_entries(model)
    dtype = torch.float16 if float16 else torch.float32
    floats.update({k: v.to(dtype) for k, v in bn_params.items()})
    state["float"] = floats
    # Running statistics of every BN (chosen pairs and plain ones), so that restoring into a
    # fresh plain model reproduces the eval outputs without copying buffers by hand.
    state["buffers"] = {**bnpairs.plain_buffers(model), **bn_buffers}
    state["activations"] = activations
    state["mpq_config"] = {n: list(pair) for n, pair in config.items()}
    return state


def restore_configuration(model: nn.Module, state: tp.Dict[str, tp.Any]) -> nn.Module:
    """Load the BN buffers and install the input quantizers of an export into a plain ``model``
    (its weights are restored by the base class)."""
    buffers = dict(model.named_buffers())
    for name, value in state.get("buffers", {}).items():
        if name not in buffers:
            raise QuantizerError(f"quantized state has buffer {name!r} that the model lacks")
        with torch.no_grad():
            buffers[name].copy_(value.to(buffers[name].dtype))
    install_restored_activations(model, state.get("activations", {}))
    return model
