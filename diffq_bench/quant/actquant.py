"""Quantization functions shared by DSQ and one-shot MPQ, for weights and activations.

Two families, each with one function for the training forward (hard values, soft or
straight-through gradient) and one pair ``levels``/``dequantize`` used both by the eval forward
and by :func:`diffq_bench.quant.restore`, so a restored model computes bit for bit what the
quantizer showed at eval:

- DSQ (Gong et al. 2019): asymmetric levels on a learnable clipping range ``[lower, upper]``,
  forward = hard quantization, gradient = derivative of the tanh-based soft step.
- LSQ (Esser et al. 2020): ``round(clamp(x / s, -Q_N, Q_P)) * s`` with a learned step ``s``, built
  on the primitives of :mod:`diffq_bench.quant.lsq` (one implementation of LSQ's gradients).

Activations are quantized by forward pre-hooks on the quantized layers (their first positional
input), installed by :func:`install_input_hooks`; restored models get the same hooks from the
exported activation state (:func:`install_restored_activations`).
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn

from ..distributed import sync_init
from . import lsq
from .errors import QuantizerError

#: Layers whose first input is an activation we quantize. Modules reading several inputs
#: (attention) or integer inputs (embeddings) keep float inputs; their weights are still quantized.
ACT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
              nn.ConvTranspose2d, nn.LSTM, nn.GRU)
ALPHA_MAX = 0.5  # DSQ's characteristic variable lives in (0, 0.5)


# ------------------------------------------------------------------------------------ DSQ
def dsq_alpha(rho: torch.Tensor) -> torch.Tensor:
    """Bounded characteristic variable ``α = 0.5·sigmoid(ρ)`` in (0, 0.5), kept off the ends."""
    return (ALPHA_MAX * torch.sigmoid(rho)).clamp(1e-4, ALPHA_MAX - 1e-4)


def dsq_rho(alpha: float) -> float:
    """Inverse of :func:`dsq_alpha` (initialisation)."""
    if not 0 < alpha < ALPHA_MAX:
        raise QuantizerError(f"alpha_init must be in (0, {ALPHA_MAX}), got {alpha!r}")
    t = alpha / ALPHA_MAX
    return math.log(t / (1 - t))


def _dsq_range(lower: torch.Tensor, upper: torch.Tensor, bits: int):
    # The width is kept strictly positive, relative to |lower| so that it survives float32
    # rounding (a constant tensor of ones would otherwise give Δ = 0 and NaNs).
    floor = (1 + lower.detach().abs()) * 1e-6
    width = torch.maximum(upper - lower, floor)
    return lower + width, width / (2 ** bits - 1)


def dsq_levels(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels in ``[0, 2**bits - 1]`` of ``x`` clipped to ``[lower, upper]`` (int64)."""
    with torch.no_grad():
        upper, delta = _dsq_range(lower.detach().float(), upper.detach().float(), bits)
        xc = torch.minimum(torch.maximum(x.detach().float(), lower.float()), upper)
        return torch.round((xc - lower) / delta).clamp(0, 2 ** bits - 1).long()


def dsq_dequantize(levels: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                   bits: int) -> torch.Tensor:
    """Values ``lower + Δ·levels`` (float32); the eval forward and restore both use this."""
    lower = lower.detach().float()
    _, delta = _dsq_range(lower, upper.detach().float(), bits)
    return lower + delta * levels.float()


def dsq_soft(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor,
             bits: int) -> torch.Tensor:
    """DSQ's differentiable soft quantization ``l + Δ(i + (φ(x) + 1)/2)`` of ``x``.

    ``φ(x) = s·tanh(k(x − m_i))`` on the interval ``i`` holding ``x`` (centre ``m_i``), with
    ``s = 1/(1 − α)`` and ``k = ln(2/α − 1)/Δ``, so φ = ±1 at the interval ends.
    """
    upper, delta = _dsq_range(lower, upper, bits)
    xc = torch.minimum(torch.maximum(x, lower), upper)  # clipping: grad to l/u where clipped
    index = torch.floor((xc - lower) / delta).detach().clamp(0, 2 ** bits - 2)
    centre = lower + (index + 0.5) * delta
    scale = 1 / (1 - alpha)
    sharp = torch.log(2 / alpha - 1) / delta
    phi = scale * torch.tanh(sharp * (xc - centre))
    return lower + delta * (index + (phi + 1) / 2)


def dsq_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor,
                 bits: int) -> torch.Tensor:
    """Training forward: the hard quantized value, with the soft function's gradient."""
    soft = dsq_soft(x, lower, upper, alpha, bits)
    hard = dsq_dequantize(dsq_levels(x, lower, upper, bits), lower, upper, bits).to(soft.dtype)
    return soft + (hard - soft).detach()


# ------------------------------------------------------------------------------------ LSQ
# The LSQ primitives (gradient scale, straight-through round and positive step, levels and
# dequantization) are those of :mod:`diffq_bench.quant.lsq`; this adds unsigned level sets
# (activations after a ReLU) and the per-call step and bit width a supernet needs.
def lsq_bounds(bits: int, signed: bool) -> tp.Tuple[int, int]:
    """``(Q_N, Q_P)``: signed ``(2^(b−1), 2^(b−1) − 1)``, unsigned ``(0, 2^b − 1)``."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def lsq_init_step(x: torch.Tensor, bits: int, signed: bool) -> float:
    """LSQ's initial step ``2·mean|x|/sqrt(Q_P)`` (positive)."""
    _, qp = lsq_bounds(bits, signed)
    mean = sync_init(x.detach().abs().float().mean(), "mean")  # the global batch's, under data parallelism
    return max(2 * float(mean) / math.sqrt(max(qp, 1)), 1e-6)


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool,
                 numel: tp.Optional[int] = None) -> torch.Tensor:
    """LSQ training forward: ``round(clamp(x/s, −Q_N, Q_P))·s``, straight-through round.

    Args:
        x: the tensor to quantize.
        step: the learned step (scalar tensor; kept positive with a straight-through clamp).
        bits, signed: the level set (:func:`lsq_bounds`).
        numel: elements per step for the gradient scale ``1/sqrt(numel·Q_P)`` (x.numel() if None).
    """
    qn, qp = lsq_bounds(bits, signed)
    grad = 1.0 / math.sqrt((numel or x.numel()) * max(qp, 1))
    s = lsq.positive_step(lsq.grad_scale(step, grad))
    return lsq.round_ste(torch.clamp(x / s, -qn, qp)) * s


def lsq_levels(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Unsigned levels ``round(clamp(x/s, −Q_N, Q_P)) + Q_N`` in ``[0, 2^b)`` (int64, flat)."""
    qn, qp = lsq_bounds(bits, signed)
    with torch.no_grad():
        return lsq.lsq_levels(x, step.detach().float().clamp_min(lsq.STEP_EPS), qn, qp)


def lsq_dequantize(levels: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """``(levels − Q_N)·s`` (float32, flat); the eval forward and restore both use this."""
    qn, _ = lsq_bounds(bits, signed)
    return lsq.lsq_dequantize(levels, step.detach().float().clamp_min(lsq.STEP_EPS), qn)


def lsq_eval(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """The quantized value of ``x`` seen at eval (float32, shape of ``x``)."""
    return lsq_dequantize(lsq_levels(x, step, bits, signed), step, bits, signed).view(x.shape)


# ------------------------------------------------------------------------ activation hooks
def act_layers(model: nn.Module, names: tp.Iterable[str]) -> tp.Dict[str, nn.Module]:
    """The modules among ``names`` whose first input is a quantizable activation, in model order."""
    wanted = set(names)
    # Linear children of attention modules (out_proj) are read functionally, never called.
    functional = {id(child) for mod in model.modules() if isinstance(mod, nn.MultiheadAttention)
                  for child in mod.children()}
    return {name: mod for name, mod in model.named_modules()
            if name in wanted and isinstance(mod, ACT_LAYERS) and id(mod) not in functional}


def install_input_hooks(modules: tp.Dict[str, nn.Module],
                        fn: tp.Callable[[str, nn.Module, torch.Tensor], torch.Tensor]
                        ) -> tp.List[tp.Any]:
    """Replace each module's first positional (floating) input by ``fn(name, module, x)``.

    Returns:
        the hook handles (``handle.remove()`` undoes them).
    """
    handles = []
    for name, module in modules.items():
        def hook(mod, inputs, _name=name):
            if not inputs or not torch.is_tensor(inputs[0]) or not inputs[0].is_floating_point():
                return None  # packed sequences and integer inputs stay as they are
            return (fn(_name, mod, inputs[0]),) + tuple(inputs[1:])
        handles.append(module.register_forward_pre_hook(hook))
    return handles


def _restored_act(entry: tp.Dict[str, tp.Any], x: torch.Tensor) -> torch.Tensor:
    kind = entry.get("kind")

    def scalar(key: str) -> torch.Tensor:  # stored as a Python float (exact float32 value)
        return torch.as_tensor(entry[key], dtype=torch.float32, device=x.device)
    if kind == "dsq":
        lower, upper = scalar("lower"), scalar("upper")
        levels = dsq_levels(x, lower, upper, entry["bits"])
        return dsq_dequantize(levels, lower, upper, entry["bits"]).to(x.dtype)
    if kind == "lsq":
        return lsq_eval(x, scalar("step"), entry["bits"], entry["signed"]).to(x.dtype)
    raise QuantizerError(f"unknown activation quantizer kind {kind!r}; valid: dsq, lsq")


_RESTORED_ATTR = "_diffq_bench_act_handles"


def install_restored_activations(model: nn.Module, activations: tp.Dict[str, tp.Dict[str, tp.Any]]
                                 ) -> None:
    """Install the exported activation quantizers on ``model`` (replacing earlier ones).

    Args:
        model: the model being restored.
        activations: module name -> entry (``kind`` dsq: ``bits``, ``lower``, ``upper``;
            ``kind`` lsq: ``bits``, ``signed``, ``step``; bounds/steps as floats), as written by
            the quantizer's export.
    """
    for handle in model.__dict__.pop(_RESTORED_ATTR, []):
        handle.remove()
    modules = dict(model.named_modules())
    missing = [name for name in activations if name not in modules]
    if missing:
        raise QuantizerError(f"quantized state quantizes the inputs of module(s) {missing} "
                             "that the model lacks")
    handles = install_input_hooks({name: modules[name] for name in activations},
                                  lambda name, mod, x: _restored_act(activations[name], x))
    model.__dict__[_RESTORED_ATTR] = handles
