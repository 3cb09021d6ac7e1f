"""Quant-Noise, scalar variant (Fan, Stock et al., ICLR 2021): intN with per-weight noise.

Each train forward, a Bernoulli(p) mask per weight picks the weights that are replaced by their
quantized value ``Q(w)``; the others stay float. The gradient flows to every weight (straight-
through: ``w + mask·(Q(w) − w).detach()``). At eval the model is fully quantized (p = 1), and the
export is the packed integer levels plus one (scale, zero point) per tensor or per output channel.

Differences from the official fairseq code, on purpose (docs/quantizers.md):

- the float weight is never overwritten (the official hook writes into ``weight.data``);
- the observer's range is computed for the real bit width (``2^bits − 1`` steps): the official
  int4 path computes it for 0..255 and then clamps the levels to 15, so most weights saturate;
- values outside the observer range are clipped to the nearest level, never reflected (the
  official ``clamp(w) + (Q(w) − w)`` maps ``w = hi + d`` to ``hi − d``).

The affine helpers (:func:`affine_params`, :func:`quantize_levels`, :func:`dequantize`) are also
used by :mod:`diffq_bench.quant.ipq` for its optional int8 centroids.
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn

from .base import BaseQuantizer, Display, QParam
from .errors import QuantizerError, check_range
from .pack import pack_uint, unpack_uint
from .rng import fill_noise
from .rng import prepare as prepare_noise

OBSERVERS = ("tensor", "channel")


def affine_params(weight: torch.Tensor, bits: int, observer: str = "tensor"
                  ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Min–max affine observer: (scale, zero_point) for ``2^bits`` levels ``0 .. 2^bits − 1``.

    The observed range always contains 0 (as PyTorch's observers do), so zero, padding and pruned
    weights stay exact.

    Args:
        weight: the tensor to observe (detached inside).
        bits: bit width of the levels, 1..16.
        observer: ``tensor`` (one range) or ``channel`` (one range per index of dim 0).
    Returns:
        ``scale`` (float32, shape ``[C]``) and ``zero_point`` (int64 in ``[0, 2^bits − 1]``, ``[C]``),
        with ``C = 1`` for ``tensor``.
    """
    if observer not in OBSERVERS:
        raise QuantizerError(f"unknown observer {observer!r}; valid: {', '.join(OBSERVERS)}")
    w = weight.detach().float()
    flat = w.reshape(1, -1) if observer == "tensor" or w.dim() == 0 else w.reshape(w.shape[0], -1)
    low = flat.min(dim=1).values.clamp(max=0)
    high = flat.max(dim=1).values.clamp(min=0)
    qmax = 2 ** bits - 1
    # An all-zero channel has no range: any positive scale reproduces it exactly.
    scale = ((high - low) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    zero_point = torch.round(-low / scale).clamp(0, qmax).long()
    return scale, zero_point


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape ``[C]`` values to broadcast over dim 0 of ``like`` (C is 1 or ``like.shape[0]``)."""
    return values.reshape([-1] + [1] * max(like.dim() - 1, 0))


def quantize_levels(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """Integer levels ``clamp(round(w / scale) + zero_point, 0, 2^bits − 1)`` (int64).

    Out-of-range values are clipped to the first/last level (never reflected).
    """
    w = weight.detach().float()
    scale_b = _broadcast(scale, w) if w.dim() else scale.reshape(())
    zero_b = _broadcast(zero_point, w) if w.dim() else zero_point.reshape(())
    levels = torch.round(w / scale_b) + zero_b
    return levels.clamp(0, 2 ** bits - 1).long()


def dequantize(levels: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(levels − zero_point) · scale``: the one formula used by eval *and* restore (bit-exact)."""
    scale_b = _broadcast(scale, levels) if levels.dim() else scale.reshape(())
    zero_b = _broadcast(zero_point, levels) if levels.dim() else zero_point.reshape(())
    return ((levels - zero_b).to(torch.float32) * scale_b.to(torch.float32)).to(dtype)


def fake_quantize(weight: torch.Tensor, bits: int, observer: str = "tensor") -> torch.Tensor:
    """``Q(w)``: quantize then dequantize with a min–max observer (no gradient)."""
    scale, zero_point = affine_params(weight, bits, observer)
    levels = quantize_levels(weight, scale, zero_point, bits)
    return dequantize(levels, scale, zero_point, weight.dtype)


class QuantNoiseQuantizer(BaseQuantizer):
    """Scalar Quant-Noise: intN training with a random share ``p`` of weights quantized per forward.

    Args:
        model: the model to quantize.
        bits: bit width of the integer levels, 2..16 (the paper uses 4 and 8).
        p: probability that a weight is replaced by its quantized value in a train forward
            (fairseq's ``--quant-noise-scalar``); 0 = float training, 1 = plain QAT/STE.
        observer: ``channel`` (one scale and zero point per output channel) or ``tensor``.
        min_size: parameters of at most this many MiB (float32) stay in float.
        float16: store the parameters left in float as float16.
        exclude: fnmatch patterns of parameter names never quantized.
    """
    independent_noise = True  # noise / masks drawn independently on each process (docs/cluster.md)
    name = "quant_noise"
    display = Display("Quant-Noise", color="tab:purple", axes=(("quant.bits", "{} bits"), ("quant.p", "p={}")),
                      inline=True, point=("quant.bits", "{}b"))
    config_keys = ("bits", "p", "observer", "min_size", "float16", "exclude")

    def __init__(self, model: nn.Module, bits: int = 8, p: float = 0.5, observer: str = "channel",
                 min_size: float = 0.01, float16: bool = False, exclude: tp.Sequence[str] = ()):
        check_range("bits", bits, 2, 16, integer=True)
        check_range("p", p, 0.0, 1.0)
        if observer not in OBSERVERS:
            raise QuantizerError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}")
        self.bits = int(bits)
        self.p = float(p)
        self.observer = observer
        super().__init__(model, min_size=min_size, float16=float16, exclude=exclude)
        if 0 < self.p < 1 and self.qparams:
            prepare_noise(self.qparams[0].param.device)

    def _observer_for(self, param: torch.Tensor) -> str:
        # A per-channel range needs a channel axis; 0-d/1-d tensors get one range.
        return self.observer if param.dim() >= 2 else "tensor"

    def _quantized(self, qp: QParam) -> torch.Tensor:
        return fake_quantize(qp.param, self.bits, self._observer_for(qp.param))

    def _train_value(self, qp: QParam, draw: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """``w + mask·(Q(w) − w).detach()``, ``mask = draw < p`` with ``draw`` U[0, 1) entries of
        ``w``'s shape (drawn here when not given)."""
        weight = qp.param
        if self.p <= 0:
            return weight
        noise = self._quantized(qp) - weight.detach()
        if self.p < 1:
            if draw is None:
                draw = self._draws([qp])[0]
            noise = noise * (draw < self.p)
        return weight + noise  # noise carries no grad: straight-through to every weight

    def _train_values(self, qps: tp.Sequence[QParam]) -> tp.List[torch.Tensor]:
        """The set of a forward with one draw for all its masks (as DiffQ's noise: one seeded,
        chunked fill on torch's threads instead of one serial ``torch.rand`` per tensor)."""
        if not 0 < self.p < 1:
            return [self._train_value(qp) for qp in qps]
        return [self._train_value(qp, draw) for qp, draw in zip(qps, self._draws(qps))]

    @staticmethod
    def _draws(qps: tp.Sequence[QParam]) -> tp.List[torch.Tensor]:
        """U[0, 1) entries for each of ``qps``, shaped as it: one fill per device."""
        out: tp.List[tp.Optional[torch.Tensor]] = [None] * len(qps)
        sets: tp.Dict[torch.device, tp.List[int]] = {}
        for i, qp in enumerate(qps):
            sets.setdefault(qp.param.device, []).append(i)
        for device, members in sets.items():
            sizes = [qps[i].param.numel() for i in members]
            flat = fill_noise(torch.empty(sum(sizes), device=device), "unit")
            for i, part in zip(members, flat.split(sizes)):
                out[i] = part.view(qps[i].param.shape)
        return tp.cast(tp.List[torch.Tensor], out)

    def _eval_value(self, qp: QParam) -> torch.Tensor:
        return self._quantized(qp)

    def _export_param(self, qp: QParam) -> tp.Dict[str, tp.Any]:
        # Computed on the parameter's device, like the eval forward, then moved: same levels.
        weight = qp.param.detach()
        scale, zero_point = affine_params(weight, self.bits, self._observer_for(weight))
        levels = quantize_levels(weight, scale, zero_point, self.bits).cpu()
        scale, zero_point = scale.cpu(), zero_point.cpu()
        return {"bits": self.bits, "shape": list(weight.shape), "scale": scale.clone(),
                "zero_point": pack_uint(zero_point, self.bits), "channels": int(scale.numel()),
                "levels": pack_uint(levels.reshape(-1), self.bits)}

    @classmethod
    def _restore_param(cls, entry: tp.Dict[str, tp.Any], like: torch.Tensor) -> torch.Tensor:
        bits, shape = int(entry["bits"]), [int(s) for s in entry["shape"]]
        check_range("bits", bits, 2, 16, integer=True)
        count = 1
        for size in shape:
            count *= size
        levels = unpack_uint(entry["levels"], bits, count).reshape(shape)
        zero_point = unpack_uint(entry["zero_point"], bits, int(entry["channels"]))
        return dequantize(levels, entry["scale"].float(), zero_point, like.dtype)

    def _param_bits(self, qp: QParam) -> torch.Tensor:
        channels = qp.param.shape[0] if self._observer_for(qp.param) == "channel" else 1
        # levels + per channel: float32 scale and a bits-wide zero point
        return torch.tensor(float(qp.param.numel() * self.bits + channels * (32 + self.bits)))
