"""DiffQ (Défossez et al. 2022): pseudo quantization noise with a learnable bit width per group.

Faithful to the paper and the official ``diffq`` package (docs/quantizers.md). Per quantized
tensor ``w`` (flattened, ``N`` entries):

- range ``scale = max(w) - min(w)`` over the whole tensor (not detached);
- one logit per group of ``group_size`` contiguous entries (0: one group for the tensor);
  ``bits = min_bits + sigmoid(logit) * (max_bits - min_bits)``, initialised at ``init_bits``;
- train forward: ``w + Δ/2 · N(0, 1)`` (Gaussian, default) or ``w + Δ · U(-½, ½)`` with
  ``Δ = scale / (2**bits - 1)`` per group; the stored float weight is never written;
- eval forward and export: ``round(bits)`` per group, asymmetric min-max levels (see
  :mod:`diffq_bench.quant.uniform`);
- size (bits): ``Σ_groups len_g · bits_g + 2·32 + 8 + bits_bits · n_groups`` with, per tensor,
  ``bits_bits = ceil(log2(1 + round(max(bits of this tensor now)) - min_bits))``, the official
  package's rule (the storage of the bit widths follows the widths actually learnt, not the
  configured ``max_bits``); the export stores the widths at that per-tensor width.

Remainder rule: when ``group_size`` does not divide ``N``, the last group is shorter
(``N mod group_size`` entries); it has its own logit and counts ``len_g · bits_g`` in the size.

Speed: the noisy weight is one custom autograd function per tensor: one fused
``addcmul`` forward over a reused noise buffer (drawn in parallel chunks on CPU:
:mod:`diffq_bench.quant.noise`), a hand-written backward (one in-place product
and one group reduction), and the range gradient routed to the arg-min/arg-max entries only.
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn

from .base import BaseQuantizer, Display, QParam
from .errors import QuantizerError, check_finite, check_range
from .pack import pack_uint, unpack_uint
from .rng import fill_noise
from .uniform import check_bits_order, tensor_range

NOISES = {"gaussian": 0.5, "uniform": 1.0}  # name -> coefficient c of Δ in the noise c·Δ·u
_BLOCK = 256  # many short rows: amax(dim=1) parallelizes over rows and vectorizes


def _argminmax(flat: torch.Tensor) -> tp.Tuple[int, int, torch.Tensor, torch.Tensor]:
    """Indices and values of min and max of a 1-D tensor in about one memory pass."""
    n = flat.numel()
    rows = n // _BLOCK
    if rows < 4:
        imin, imax = int(flat.argmin()), int(flat.argmax())
        return imin, imax, flat[imin], flat[imax]
    blocks = flat[:rows * _BLOCK].view(rows, _BLOCK)
    mins, maxs = blocks.amin(dim=1), blocks.amax(dim=1)  # fast paths; aminmax(dim) is not
    rmin, rmax = int(mins.argmin()), int(maxs.argmax())
    imin = rmin * _BLOCK + int(flat[rmin * _BLOCK:(rmin + 1) * _BLOCK].argmin())
    imax = rmax * _BLOCK + int(flat[rmax * _BLOCK:(rmax + 1) * _BLOCK].argmax())
    if rows * _BLOCK < n:  # the tail that does not fill a block
        tail = flat[rows * _BLOCK:]
        tmin, tmax = int(tail.argmin()), int(tail.argmax())
        if tail[tmin] < flat[imin]:
            imin = rows * _BLOCK + tmin
        if tail[tmax] > flat[imax]:
            imax = rows * _BLOCK + tmax
    return imin, imax, flat[imin], flat[imax]


def _code_width(max_code: int) -> int:
    """Bits needed to store the integers 0..``max_code``."""
    return max_code.bit_length()


def _grouped(flat: torch.Tensor, group_size: int) -> tp.List[tp.Tuple[torch.Tensor, slice]]:
    """``[(2-D view, group slice)]``: full groups as ``(n_full, g)``, the remainder as ``(1, r)``."""
    n = flat.numel()
    g = group_size if group_size > 0 else n
    full = n // g
    parts = []
    if full:
        parts.append((flat[:full * g].view(full, g), slice(0, full)))
    if full * g < n:
        parts.append((flat[full * g:].view(1, n - full * g), slice(full, full + 1)))
    return parts


def grouped_levels(weight: torch.Tensor, bits: torch.Tensor, low: float, high: float,
                   group_size: int) -> torch.Tensor:
    """Levels ``round((w - min) / (max - min) * (2**bits_g - 1))`` per group (int32, flat)."""
    flat = weight.detach().reshape(-1).float()
    out = torch.zeros(flat.numel(), dtype=torch.int32, device=flat.device)
    scale = high - low
    if scale <= 0:  # constant tensor: every weight is exactly ``low``
        return out
    steps = torch.exp2(bits.float()) - 1
    for (w_v, sl), (o_v, _) in zip(_grouped(flat, group_size), _grouped(out, group_size)):
        st = steps[sl].unsqueeze(1)
        levels = torch.round((w_v - low) / scale * st)
        o_v.copy_(torch.minimum(levels.clamp_(min=0), st))
    return out


def grouped_dequantize(levels: torch.Tensor, bits: torch.Tensor, low: float, high: float,
                       group_size: int) -> torch.Tensor:
    """``levels * ((max - min) / (2**bits_g - 1)) + min`` per group (float32, flat).

    The one dequantization used by both the eval forward and restore (bit-identical outputs).
    """
    steps = torch.exp2(bits.float()) - 1
    step = torch.tensor(high - low, dtype=torch.float32, device=levels.device) / steps
    low_t = torch.tensor(low, dtype=torch.float32, device=levels.device)
    out = torch.empty(levels.numel(), dtype=torch.float32, device=levels.device)
    for (l_v, sl), (o_v, _) in zip(_grouped(levels, group_size), _grouped(out, group_size)):
        torch.mul(l_v, step[sl].unsqueeze(1), out=o_v)
        o_v.add_(low_t)
    return out


def _by_width(levels: torch.Tensor, bits: torch.Tensor, group_size: int
              ) -> tp.List[tp.Tuple[int, torch.Tensor]]:
    """``[(width, levels of all groups of that width)]`` in ascending width, groups in order.

    Full groups are gathered with one stable sort (no per-width pass over all weights); the
    shorter remainder group, if any, goes at the end of its width's chunk.
    """
    n = levels.numel()
    g = group_size or n
    n_full, rem = n // g, n % g
    widths_full = bits[:n_full]
    order = torch.sort(widths_full, stable=True).indices
    rows = levels[:n_full * g].view(n_full, g).index_select(0, order)
    counts = torch.bincount(widths_full, minlength=17).tolist() if n_full else [0] * 17
    tail = levels[n_full * g:] if rem else None
    tail_width = int(bits[-1]) if tail is not None else -1
    out, start = [], 0
    for width in range(1, 17):
        pieces = []
        if counts[width]:
            pieces.append(rows[start:start + counts[width]].reshape(-1))
            start += counts[width]
        if width == tail_width:
            pieces.append(tail.reshape(-1))
        if pieces:
            out.append((width, torch.cat(pieces) if len(pieces) > 1 else pieces[0]))
    return out


def _from_widths(read: tp.Callable[[int, int], torch.Tensor], bits: torch.Tensor, n: int,
                 group_size: int) -> torch.Tensor:
    """Inverse of :func:`_by_width`: ``read(width, count)`` returns the next chunk's levels."""
    g = group_size or n
    n_full, rem = n // g, n % g
    widths_full = bits[:n_full]
    order = torch.sort(widths_full, stable=True).indices
    counts = torch.bincount(widths_full, minlength=17).tolist() if n_full else [0] * 17
    tail_width = int(bits[-1]) if rem else -1
    rows = torch.empty(n_full, g, dtype=torch.int32)
    tail = torch.empty(rem, dtype=torch.int32)
    start = 0
    for width in range(1, 17):
        count = counts[width] * g + (rem if width == tail_width else 0)
        if not count:
            continue
        chunk = read(width, count)
        rows[start:start + counts[width]] = chunk[:counts[width] * g].view(-1, g)
        start += counts[width]
        if width == tail_width:
            tail = chunk[counts[width] * g:]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n_full)
    levels = torch.empty(n, dtype=torch.int32)
    # a gather (index_select) is much cheaper than scattering rows back with advanced indexing
    torch.index_select(rows, 0, inverse, out=levels[:n_full * g].view(n_full, g))
    levels[n_full * g:] = tail
    return levels


class _NoisePool:
    """Reusable noise buffers: fresh large allocations cost page faults on every step."""

    def __init__(self) -> None:
        self.free: tp.List[torch.Tensor] = []

    def take(self, like: torch.Tensor) -> torch.Tensor:
        for i, buf in enumerate(self.free):
            if buf.numel() == like.numel() and buf.device == like.device and buf.dtype == like.dtype:
                return self.free.pop(i)
        return torch.empty(like.numel(), dtype=like.dtype, device=like.device)

    def give(self, buf: torch.Tensor) -> None:
        if len(self.free) < 2:
            self.free.append(buf)


class _PseudoQuantNoise(torch.autograd.Function):
    """``w + c·Δ_g·u`` with ``Δ_g = scale / (2**bits_g - 1)``, gradients to ``w`` and the logits."""

    @staticmethod
    def forward(ctx, weight, logits, min_bits, span, group_size, coef, noise, pool, fixed):
        flat = weight.detach().reshape(-1)
        imin, imax, low, high = _argminmax(flat)
        scale = high - low
        sig = torch.sigmoid(logits.detach())
        den = torch.exp2(min_bits + span * sig) - 1
        delta = scale * coef / den
        if fixed is not None:
            u = fixed.reshape(-1).to(flat)
        else:
            u = fill_noise(pool.take(flat), noise)
        out = torch.empty_like(flat)
        out_parts = _grouped(out, group_size)
        for (w_v, sl), (u_v, _), (o_v, _) in zip(_grouped(flat, group_size),
                                                  _grouped(u, group_size), out_parts):
            torch.addcmul(w_v, u_v, delta[sl].unsqueeze(1), out=o_v)
        ctx.u, ctx.pool, ctx.owned = u, pool, fixed is None
        ctx.meta = (imin, imax, group_size, coef, span)
        ctx.save_for_backward(sig, den, scale)
        return out.view_as(weight)

    @staticmethod
    def backward(ctx, grad_out):
        sig, den, scale = ctx.saved_tensors
        imin, imax, group_size, coef, span = ctx.meta
        u = ctx.u
        if u is None:
            raise RuntimeError("DiffQ noise: backward ran twice through the same forward "
                               "(retain_graph is not supported by the pseudo-quantization noise)")
        ctx.u = None
        grad = grad_out.reshape(-1)
        if not ctx.owned:
            u = u.clone()
        u.mul_(grad)  # u is ours and not needed afterwards: reuse it for grad·u
        grad_delta = torch.cat([part.sum(1) for part, _ in _grouped(u, group_size)])
        if ctx.owned:
            ctx.pool.give(u)
        # Δ = c·scale/den, den = 2**bits - 1, bits = min + span·sigmoid(logit)
        grad_scale = (grad_delta * coef / den).sum()
        dden = (den + 1) * math.log(2) * span * sig * (1 - sig)
        grad_logits = -grad_delta * coef * scale / den.square() * dden
        grad_w = grad.clone()
        grad_w[imax] += grad_scale
        grad_w[imin] -= grad_scale
        return grad_w.view_as(grad_out), grad_logits, None, None, None, None, None, None, None


class DiffQuantizer(BaseQuantizer):
    """DiffQ: differentiable model compression via pseudo quantization noise.

    Args:
        model: the model to quantize.
        group_size: weights per learnable bit width; 0 = one per tensor. When it does not divide
            a tensor, that tensor's last group is shorter. It must divide at least one tensor.
        min_bits: lower bound of the bit width (in [1, 16), < max_bits).
        max_bits: upper bound of the bit width (in (1, 16]).
        init_bits: initial bit width, strictly between min_bits and max_bits.
        noise: ``gaussian`` (std Δ/2) or ``uniform`` (Δ·U(-½, ½)).
        penalty: λ >= 0; :meth:`penalty_term` is λ · :meth:`model_size` (MiB).
        min_size: parameters of at most this many MiB stay float.
        float16: store the float parameters as float16.
        exclude: fnmatch patterns of parameter names kept in float.
    """
    independent_noise = True  # noise / masks drawn independently on each process (docs/cluster.md)
    name = "diffq"
    display = Display("DiffQ", color="tab:red", axes=(("lambda", "λ={}"), ("group_size", "g={}")),
                      series_axis="group_size", point=("lambda", "λ={:g}"))
    config_keys = ("group_size", "min_bits", "max_bits", "init_bits", "noise", "penalty",
                   "min_size", "float16", "exclude")

    def __init__(self, model: nn.Module, group_size: int = 16, min_bits: float = 2,
                 max_bits: float = 15, init_bits: float = 8, noise: str = "gaussian",
                 penalty: float = 0.0, min_size: float = 0.01, float16: bool = False,
                 exclude: tp.Sequence[str] = ()):
        check_range("group_size", group_size, 0, float("inf"), integer=True)
        check_bits_order(min_bits, max_bits)
        if not (isinstance(init_bits, (int, float)) and min_bits < init_bits < max_bits):
            raise QuantizerError(f"init_bits must be strictly between min_bits={min_bits} and "
                                 f"max_bits={max_bits}, got {init_bits!r}")
        if noise not in NOISES:
            raise QuantizerError(f"noise must be one of {sorted(NOISES)}, got {noise!r}")
        check_range("penalty", penalty, 0, float("inf"))
        self.group_size, self.noise, self.penalty = int(group_size), noise, float(penalty)
        self.min_bits, self.max_bits, self.init_bits = min_bits, max_bits, init_bits
        super().__init__(model, min_size=min_size, float16=float16, exclude=exclude)
        if self.group_size and self.qparams and not any(
                qp.param.numel() % self.group_size == 0 for qp in self.qparams):
            sizes = sorted({qp.param.numel() for qp in self.qparams})[:8]
            self.detach()  # leave the model as it was: no hooks of a quantizer that never was
            raise QuantizerError(f"group_size={self.group_size} divides none of the quantized "
                                 f"tensor sizes {sizes}...; use 0 (one group per tensor) or a "
                                 "divisor of the tensor sizes (8, 16 in the paper)")
        p0 = (init_bits - min_bits) / (max_bits - min_bits)
        logit0 = math.log(p0 / (1 - p0))
        self.logits: tp.Dict[str, nn.Parameter] = {}
        for qp in self.qparams:
            groups = self._num_groups(qp)
            self.logits[qp.name] = nn.Parameter(torch.full((groups,), logit0, device=qp.param.device))
        self._pools = {qp.name: _NoisePool() for qp in self.qparams}
        self._bits_lo = int(round(min_bits))
        self._bits_hi = int(round(max_bits))

    # ------------------------------------------------------------------------------ helpers
    def _num_groups(self, qp: QParam) -> int:
        n = qp.param.numel()
        return 1 if self.group_size == 0 else -(-n // self.group_size)

    def _logit(self, qp: QParam) -> nn.Parameter:
        logit = self.logits[qp.name]
        if logit.device != qp.param.device:  # model moved after the quantizer was built
            logit.data = logit.data.to(qp.param.device)
        return logit

    def get_bits(self, qp: QParam) -> torch.Tensor:
        """Continuous bit width per group (differentiable in the logits)."""
        return self.min_bits + torch.sigmoid(self._logit(qp)) * (self.max_bits - self.min_bits)

    def eval_bits(self, qp: QParam) -> torch.Tensor:
        """Integer bit width per group used at eval and export: ``round(bits)`` (int64)."""
        logit = self._logit(qp).detach()
        check_finite(f"{qp.name} (bit logits)", logit, "DiffQ logit")
        bits = torch.round(self.min_bits + torch.sigmoid(logit) * (self.max_bits - self.min_bits))
        return bits.long().clamp_(self._bits_lo, self._bits_hi)

    # ----------------------------------------------------------------------- quantizer API
    def quantizer_parameters(self) -> tp.List[nn.Parameter]:
        return [self.logits[qp.name] for qp in self.qparams]

    def _train_value(self, qp: QParam, fixed_noise: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        return _PseudoQuantNoise.apply(qp.param, self._logit(qp), float(self.min_bits),
                                       float(self.max_bits - self.min_bits), self.group_size,
                                       NOISES[self.noise], self.noise, self._pools[qp.name],
                                       fixed_noise)

    def _eval_key(self, qp: QParam) -> tp.Any:
        logit = self._logit(qp)
        return (logit._version, logit.data_ptr())

    def _quantize(self, qp: QParam) -> tp.Tuple[torch.Tensor, torch.Tensor, float, float]:
        check_finite(qp.name, qp.param.detach(), "weight")
        bits = self.eval_bits(qp)
        low, high = tensor_range(qp.param)
        return grouped_levels(qp.param, bits, low, high, self.group_size), bits, low, high

    def _eval_value(self, qp: QParam) -> torch.Tensor:
        levels, bits, low, high = self._quantize(qp)
        out = grouped_dequantize(levels, bits, low, high, self.group_size)
        return out.view_as(qp.param).to(qp.param.dtype)

    def _export_param(self, qp: QParam) -> tp.Dict[str, tp.Any]:
        levels, bits, low, high = self._quantize(qp)
        levels, bits = levels.cpu(), bits.cpu()
        chunks = [pack_uint(values, width) for width, values in _by_width(levels, bits, self.group_size)]
        codes = bits - self._bits_lo
        # the width of the codes of this tensor: its largest code fits (= bits_bits(...) of the
        # size accounting for an integer min_bits; one more bit at most for a fractional one)
        width = _code_width(int(codes.max()))
        return {"shape": list(qp.param.shape), "min": low, "max": high,
                "group_size": self.group_size, "bits_lo": self._bits_lo, "bits_bits": width,
                "bits": pack_uint(codes, width) if width else torch.zeros(0, dtype=torch.uint8),
                "levels": torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)}

    @classmethod
    def _restore_param(cls, entry: tp.Dict[str, tp.Any], like: torch.Tensor) -> torch.Tensor:
        n, g = like.numel(), int(entry["group_size"])
        groups = 1 if g == 0 else -(-n // g)
        nb = int(entry["bits_bits"])
        codes = unpack_uint(entry["bits"], nb, groups) if nb else torch.zeros(groups, dtype=torch.long)
        bits = codes + int(entry["bits_lo"])
        data, offset = entry["levels"], 0

        def read(width: int, count: int) -> torch.Tensor:
            nonlocal offset
            size = (count * width + 7) // 8
            if offset + size > data.numel():
                raise QuantizerError(f"DiffQ levels hold {data.numel()} bytes, the bit widths "
                                     f"need more: corrupt state")
            offset += size
            return unpack_uint(data[offset - size:offset], width, count, dtype=torch.int32)

        levels = _from_widths(read, bits, n, g)
        if offset != data.numel():
            raise QuantizerError(f"DiffQ levels hold {data.numel()} bytes, the bit widths need "
                                 f"{offset}: corrupt state")
        out = grouped_dequantize(levels.to(like.device), bits.to(like.device), entry["min"],
                                 entry["max"], g)
        return out.view(like.shape)

    def _param_bits(self, qp: QParam, rounded: bool = False) -> torch.Tensor:
        bits = self.eval_bits(qp).float() if rounded else self.get_bits(qp)
        n, groups = qp.param.numel(), bits.numel()
        g = self.group_size or n
        last = n - g * (groups - 1)  # the remainder group counts only its own entries
        weights = bits.sum() * g if last == g else bits.sum() * g + (last - g) * bits[-1]
        return weights + (64 + 8 + self.bits_bits(qp, bits) * groups)

    def bits_bits(self, qp: QParam, bits: tp.Optional[torch.Tensor] = None) -> int:
        """Bits storing each group's width in ``qp``'s export: as the official package,
        ``ceil(log2(1 + round(max(bits)) - min_bits))`` over the tensor's current bits (0 when a
        single width is possible). A constant of the size (no gradient).

        Args:
            qp: the parameter.
            bits: its bits per group (default: the current continuous ones).
        """
        bits = self.get_bits(qp) if bits is None else bits
        codes = 1 + round(float(bits.detach().max())) - self.min_bits
        return max(0, math.ceil(math.log2(codes))) if codes > 1 else 0

    def true_model_size(self) -> float:
        """Analytic size (MiB) with the exported (rounded) bit widths."""
        total = sum(float(self._param_bits(qp, rounded=True)) for qp in self.qparams)
        total += sum(p.numel() for _, p in self._float_params) * (16 if self.float16 else 32)
        return total / 8 / 2 ** 20

    def bits_per_weight(self) -> float:
        numel = sum(qp.param.numel() for qp in self.qparams)
        if numel == 0:
            return 0.0
        return sum(float(self._param_bits(qp, rounded=True)) for qp in self.qparams) / numel

    def penalty_term(self) -> torch.Tensor:
        """λ · :meth:`model_size` (MiB), differentiable in the logits."""
        return self.penalty * self.model_size()
