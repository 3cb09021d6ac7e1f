"""BatchNorm per bit-width pair for one-shot MPQ supernets (Tang et al. 2024).

A sub-network's activations have statistics that depend on the bit widths upstream, so one shared
BatchNorm cannot serve every configuration: each BN of the model that sits after a quantized layer
is replaced by a :class:`SwitchableBN` holding one copy per (weight-bits, act-bits) pair of that
layer, its *producer* (the quantized layer registered just before it). A BN that precedes every
quantized layer (the BN after an RGB stem too small to quantize) sees inputs that no configuration
changes: it stays a plain BatchNorm.

Helpers here also recalibrate the active copies on a few batches (the search's "BN recalibration")
and read the active copies back under the plain model's names (export, honest float size).
"""
from __future__ import annotations

import copy
import typing as tp

import torch
from torch import nn

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def pair_key(wbits: int, abits: int) -> str:
    """Key of the BN copy serving weight bits ``wbits`` and input bits ``abits``."""
    return f"w{wbits}a{abits}"


class SwitchableBN(nn.Module):
    """One BatchNorm per bit-width pair; ``key`` (set by the quantizer) selects the active one.

    Args:
        bn: the model's BatchNorm, deep-copied once per key (all copies start identical).
        keys: the pair keys (:func:`pair_key`); the last one is active at first.
    """

    def __init__(self, bn: nn.Module, keys: tp.Sequence[str]):
        super().__init__()
        self.bns = nn.ModuleDict({key: copy.deepcopy(bn) for key in keys})
        self.key = keys[-1]
        self.capture: tp.Optional[tp.Callable[["SwitchableBN", torch.Tensor], None]] = None

    @property
    def active(self) -> nn.Module:
        """The BatchNorm copy of the current key."""
        return self.bns[self.key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bns[self.key](x)
        if self.capture is not None:
            self.capture(self, out)
        return out


def batchnorm_param_ids(model: nn.Module) -> tp.Set[int]:
    """Ids of every BatchNorm parameter of ``model`` (these always stay float)."""
    return {id(p) for m in model.modules() if isinstance(m, BN_TYPES + (SwitchableBN,))
            for p in m.parameters()}


def producers(model: nn.Module, quantized: tp.Collection[str]) -> tp.Dict[str, tp.Optional[str]]:
    """BN module name -> the last module of ``quantized`` registered before it (None if none).

    Registration order (``named_modules``) is the order of construction, which for the CNNs,
    LMs and separation models here is the forward order of a layer and its normalization.
    """
    out: tp.Dict[str, tp.Optional[str]] = {}
    last = None
    for name, module in model.named_modules():
        if name in quantized:
            last = name
        if isinstance(module, BN_TYPES + (SwitchableBN,)):
            out[name] = last
    return out


def swap_batchnorms(model: nn.Module, names: tp.Iterable[str], keys: tp.Sequence[str]) -> None:
    """Replace the BatchNorm modules ``names`` of ``model`` by :class:`SwitchableBN` (in place)."""
    for name in names:
        module = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, SwitchableBN(module, keys))


def recalibrate(model: nn.Module, forward: tp.Callable[[tp.Any], tp.Any], batches: tp.Sequence[tp.Any]) -> None:
    """Re-estimate the running statistics of the active BN copies on ``batches``.

    The model runs in eval mode (quantized weights and inputs as at test time) with only the
    active copies in train mode, cumulating exact averages (``momentum=None``) over the batches.

    Args:
        model: the supernet.
        forward: batch -> anything; runs the model on one batch (e.g. ``task.step``).
        batches: the calibration batches.
    """
    active = [m.active for m in model.modules() if isinstance(m, SwitchableBN)]
    if not active or not batches:
        return
    was_training = model.training
    momenta = [bn.momentum for bn in active]
    model.eval()
    for bn in active:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
        bn.train()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(batch)
    finally:
        for bn, momentum in zip(active, momenta):
            bn.momentum = momentum
        model.train(was_training)


def active_entries(model: nn.Module) -> tp.Tuple[tp.Dict[str, torch.Tensor], tp.Dict[str, torch.Tensor]]:
    """Active copy of each :class:`SwitchableBN`, under the plain model's names: (params, buffers)."""
    params, buffers = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, SwitchableBN):
            continue
        prefix = f"{name}." if name else ""
        for attr, p in module.active.named_parameters():
            params[prefix + attr] = p.detach().cpu().clone()
        for attr, b in module.active.named_buffers():
            buffers[prefix + attr] = b.detach().cpu().clone()
    return params, buffers


def plain_buffers(model: nn.Module) -> tp.Dict[str, torch.Tensor]:
    """Buffers of the BatchNorms left plain (no quantized producer), by name."""
    copies = {id(bn) for m in model.modules() if isinstance(m, SwitchableBN) for bn in m.bns.values()}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BN_TYPES) and id(module) not in copies:
            prefix = f"{name}." if name else ""
            out.update({prefix + attr: b.detach().cpu().clone() for attr, b in module.named_buffers()})
    return out


