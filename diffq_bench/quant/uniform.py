"""Per-tensor asymmetric min-max quantization (shared by DiffQ's eval path) and the QAT/STE baseline.

One quantize function and one dequantize function serve the eval forward and :func:`restore`, so
the restored model computes bit for bit what the quantizer showed at eval.

Fractional bits (QAT): ``bits`` = b gives ``L = round(2**b)`` levels, evenly spaced over
``[min, max]`` (for integer b this is the usual ``2**b`` levels). The levels are stored with exact
mixed-radix packing (:func:`~diffq_bench.quant.pack.pack_mixed_radix`), and the analytic size
counts ``log2(L)`` bits per weight (= b for integer b), so e.g. 1.58 bits means 3 levels.
"""
from __future__ import annotations

import math
import typing as tp

import torch

from .base import BaseQuantizer, Display, QParam
from .errors import QuantizerError, check_finite, check_range
from .pack import pack_mixed_radix, pack_uint, unpack_mixed_radix, unpack_uint


def tensor_range(weight: torch.Tensor) -> tp.Tuple[float, float]:
    """``(min, max)`` of ``weight`` as Python floats holding exact float32 values."""
    low, high = torch.aminmax(weight.detach().reshape(-1).float())
    return float(low), float(high)


def quantize_levels(weight: torch.Tensor, low: float, high: float,
                    steps: tp.Union[float, torch.Tensor]) -> torch.Tensor:
    """Levels ``round((w - min) / (max - min) * steps)`` in ``[0, steps]`` (int64, flat).

    Args:
        weight: the float tensor (any shape; flattened).
        low, high: the range (float32 values), as returned by :func:`tensor_range`.
        steps: ``2**bits - 1``: a number, or a per-element float tensor (DiffQ's groups).
    """
    flat = weight.detach().reshape(-1).float()
    scale = high - low
    if scale <= 0:  # constant tensor: every weight is exactly ``low``
        return torch.zeros(flat.numel(), dtype=torch.long, device=flat.device)
    levels = torch.round((flat - low) / scale * steps)
    if isinstance(steps, torch.Tensor):
        levels = torch.minimum(levels.clamp_(min=0), steps)
    else:
        levels = levels.clamp_(0, steps)
    return levels.long()


def dequantize_levels(levels: torch.Tensor, low: float, high: float,
                      steps: tp.Union[float, torch.Tensor]) -> torch.Tensor:
    """Inverse map ``levels / steps * (max - min) + min`` as float32 (flat).

    Two separate elementwise ops in a fixed order (no fused multiply-add), so CPU and CUDA agree.
    """
    step = torch.as_tensor(high - low, dtype=torch.float32, device=levels.device) / steps
    return levels.float() * step + torch.tensor(low, dtype=torch.float32, device=levels.device)


def levels_for_bits(bits: float) -> int:
    """Number of quantization levels ``round(2**bits)`` used for (possibly fractional) ``bits``."""
    return int(round(2 ** bits))


class UniformQuantizer(BaseQuantizer):
    """QAT baseline: straight-through per-tensor min-max quantization at fixed bits.

    Train forward: ``w + (Q(w) - w).detach()`` (gradient flows to ``w`` unchanged); eval forward:
    ``Q(w)``. Size: ``log2(L) * numel + 64`` bits per tensor (L levels, the range as 2 float32).

    Args:
        model: the model to quantize.
        bits: bit width in [1, 16]; fractional values give ``round(2**bits)`` levels.
        min_size: parameters of at most this many MiB stay float.
        float16: store the float parameters as float16.
        exclude: fnmatch patterns of parameter names kept in float.
    """
    name = "qat"
    display = Display("QAT", color="tab:orange", axes=(("quant.bits", "{} bits"),), inline=True,
                      point=("quant.bits", "{}b"))
    config_keys = ("bits", "min_size", "float16", "exclude")

    def __init__(self, model: torch.nn.Module, bits: float = 8, min_size: float = 0.01,
                 float16: bool = False, exclude: tp.Sequence[str] = ()):
        check_range("bits", bits, 1, 16)
        self.bits = bits
        self.levels = levels_for_bits(bits)
        super().__init__(model, min_size=min_size, float16=float16, exclude=exclude)

    def _quantized(self, qp: QParam) -> torch.Tensor:
        check_finite(qp.name, qp.param.detach(), "weight")
        low, high = tensor_range(qp.param)
        levels = quantize_levels(qp.param, low, high, self.levels - 1)
        return dequantize_levels(levels, low, high, self.levels - 1).view_as(qp.param)

    def _train_value(self, qp: QParam) -> torch.Tensor:
        weight = qp.param
        return weight + (self._quantized(qp).to(weight.dtype) - weight).detach()

    def _eval_key(self, qp: QParam) -> tp.Any:
        return ()

    def _eval_value(self, qp: QParam) -> torch.Tensor:
        return self._quantized(qp).to(qp.param.dtype)

    def _export_param(self, qp: QParam) -> tp.Dict[str, tp.Any]:
        low, high = tensor_range(qp.param)
        levels = quantize_levels(qp.param, low, high, self.levels - 1).cpu()
        nbits = int(math.log2(self.levels))
        if 2 ** nbits == self.levels:
            packed = pack_uint(levels, nbits)
        else:
            packed = pack_mixed_radix(levels, self.levels)
        return {"shape": list(qp.param.shape), "min": low, "max": high,
                "num_levels": self.levels, "levels": packed}

    @classmethod
    def _restore_param(cls, entry: tp.Dict[str, tp.Any], like: torch.Tensor) -> torch.Tensor:
        count = like.numel()
        num = int(entry["num_levels"])
        nbits = int(math.log2(num))
        if 2 ** nbits == num:
            levels = unpack_uint(entry["levels"], nbits, count)
        else:
            levels = unpack_mixed_radix(entry["levels"], num, count)
        out = dequantize_levels(levels.to(like.device), entry["min"], entry["max"], num - 1)
        return out.view(like.shape)

    def _param_bits(self, qp: QParam) -> torch.Tensor:
        return torch.tensor(qp.param.numel() * math.log2(self.levels) + 64.0)


def check_bits_order(min_bits: float, max_bits: float) -> None:
    """Shared check: ``1 <= min_bits < max_bits <= 16``."""
    check_range("min_bits", min_bits, 1, 16)
    check_range("max_bits", max_bits, 1, 16)
    if min_bits >= max_bits:
        raise QuantizerError(f"min_bits must be < max_bits (both in [1, 16]), got "
                             f"min_bits={min_bits}, max_bits={max_bits}")
