"""LSQ (Esser et al., ICLR 2020): learned step size quantization of the weights.

``ŵ = round(clamp(w / s, -Q_N, Q_P)) · s`` with a straight-through round, signed levels
``Q_N = 2**(b-1)``, ``Q_P = 2**(b-1) - 1``, one learnable step ``s`` per tensor initialised at
``2·mean|w| / sqrt(Q_P)`` and its gradient scaled by ``g = 1 / sqrt(numel · Q_P)``. The step is
kept positive: the forward uses ``max(s, eps)`` with a straight-through clamp, so a step pushed
below ``eps`` still receives gradient and can recover.

Export: levels ``q + Q_N`` in ``[0, 2**b)`` packed at ``b`` bits, the step as one float32.
Size: ``b · numel + 32`` bits per tensor.
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn

from .base import BaseQuantizer, Display, QParam
from .errors import QuantizerError, check_finite, check_range
from .pack import pack_uint, unpack_uint

STEP_EPS = 1e-8


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``scale`` (LSQ's step-size gradient scale)."""
    y = x * scale
    return (x - y).detach() + y


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient."""
    return (torch.round(x) - x).detach() + x


class _PositiveST(torch.autograd.Function):
    # A custom function, not ``(clamp(s) - s).detach() + s``: with s = -0.5 that expression
    # rounds to exactly 0 in float32 (1e-8 is lost against 0.5) and the forward divides by zero.
    @staticmethod
    def forward(ctx, step):
        return step.clamp(min=STEP_EPS)

    @staticmethod
    def backward(ctx, grad):
        return grad


def positive_step(step: torch.Tensor) -> torch.Tensor:
    """``max(step, STEP_EPS)`` with a straight-through (identity) gradient."""
    return _PositiveST.apply(step)


def lsq_levels(weight: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """Unsigned levels ``round(clamp(w / s, -Q_N, Q_P)) + Q_N`` (int64, flat)."""
    ratio = weight.detach().reshape(-1).float() / step.detach().float()
    return (torch.round(ratio.clamp_(-qn, qp)) + qn).long()


def lsq_dequantize(levels: torch.Tensor, step: torch.Tensor, qn: int) -> torch.Tensor:
    """``(levels - Q_N) · s`` as float32 (flat): used by the eval forward and by restore."""
    return (levels - qn).float() * step.to(levels.device, torch.float32)


class LSQQuantizer(BaseQuantizer):
    """LSQ weight quantization with a learnable step per tensor.

    Args:
        model: the model to quantize (usually a trained float model, fine-tuned with a lower lr).
        bits: integer bit width in [2, 16].
        min_size: parameters of at most this many MiB stay float.
        float16: store the float parameters as float16.
        exclude: fnmatch patterns of parameter names kept in float.
    """
    name = "lsq"
    display = Display("LSQ", color="tab:green", axes=(("quant.bits", "{} bits"),), inline=True,
                      point=("quant.bits", "{}b"))
    config_keys = ("bits", "min_size", "float16", "exclude")
    default_lr = None  # steps train with the main optimizer's learning rate

    def __init__(self, model: nn.Module, bits: int = 4, min_size: float = 0.01,
                 float16: bool = False, exclude: tp.Sequence[str] = ()):
        check_range("bits", bits, 2, 16, integer=True)
        self.bits = int(bits)
        self.qn, self.qp = 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        super().__init__(model, min_size=min_size, float16=float16, exclude=exclude)
        self.steps: tp.Dict[str, nn.Parameter] = {}
        for qp in self.qparams:
            weight = qp.param.detach()
            try:
                check_finite(qp.name, weight, "weight")
            except QuantizerError:
                self.detach()  # leave the model as it was: no hooks of a quantizer that never was
                raise
            init = 2 * weight.abs().mean().float() / math.sqrt(self.qp)
            init = init.clamp(min=STEP_EPS)
            self.steps[qp.name] = nn.Parameter(init.reshape(1).to(weight.device))

    def quantizer_parameters(self) -> tp.List[nn.Parameter]:
        return [self.steps[qp.name] for qp in self.qparams]

    def _step(self, qp: QParam) -> nn.Parameter:
        step = self.steps[qp.name]
        if step.device != qp.param.device:  # model moved after the quantizer was built
            step.data = step.data.to(qp.param.device)
        return step

    def _train_value(self, qp: QParam) -> torch.Tensor:
        weight = qp.param
        g = 1.0 / math.sqrt(weight.numel() * self.qp)
        step = positive_step(grad_scale(self._step(qp), g))
        ratio = torch.clamp(weight / step, -self.qn, self.qp)
        return round_ste(ratio) * step

    def _eval_key(self, qp: QParam) -> tp.Any:
        step = self._step(qp)
        return (step._version, step.data_ptr())

    def _quantize(self, qp: QParam) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        check_finite(qp.name, qp.param.detach(), "weight")
        step = self._step(qp).detach().clamp(min=STEP_EPS)
        check_finite(f"{qp.name} (LSQ step)", step, "LSQ step")
        return lsq_levels(qp.param, step, self.qn, self.qp), step

    def _eval_value(self, qp: QParam) -> torch.Tensor:
        levels, step = self._quantize(qp)
        return lsq_dequantize(levels, step, self.qn).view_as(qp.param).to(qp.param.dtype)

    def _export_param(self, qp: QParam) -> tp.Dict[str, tp.Any]:
        levels, step = self._quantize(qp)
        return {"shape": list(qp.param.shape), "bits": self.bits,
                "step": step.float().cpu().clone(), "levels": pack_uint(levels.cpu(), self.bits)}

    @classmethod
    def _restore_param(cls, entry: tp.Dict[str, tp.Any], like: torch.Tensor) -> torch.Tensor:
        bits = int(entry["bits"])
        levels = unpack_uint(entry["levels"], bits, like.numel()).to(like.device)
        return lsq_dequantize(levels, entry["step"], 2 ** (bits - 1)).view(like.shape)

    def _param_bits(self, qp: QParam) -> torch.Tensor:
        return torch.tensor(float(self.bits * qp.param.numel() + 32))
