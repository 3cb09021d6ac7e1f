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

Speed: every tensor of a forward is handled at once (a small model has a dozen tensors, and a
dozen small ops per tensor cost more than the arithmetic): one flat buffer of all the weights,
one noise draw for all (in parallel seeded chunks on CPU: :mod:`diffq_bench.quant.rng`), one
custom autograd node whose forward is a few whole-buffer ops (block min/max, one ``addcmul``)
and whose hand-written backward is one product and one group reduction, with the range gradient
routed to the arg-min/arg-max entries only; the size term is one node too. Big buffers are reused
across steps once nothing refers to them (fresh ones fault their pages in on every step).
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn

from .base import MB, BaseQuantizer, Display, QParam
from .errors import QuantizerError, check_finite, check_range
from .pack import pack_groups, pack_uint, unpack_groups, unpack_uint
from .rng import fill_noise
from .rng import prepare as prepare_noise
from .state import load_tensors
from .uniform import check_bits_order, tensor_range

NOISES = {"gaussian": 0.5, "uniform": 1.0}  # name -> coefficient c of Δ in the noise c·Δ·u
_BLOCK = 256  # many short rows: amax(dim=1) parallelizes over rows and vectorizes


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
    """Levels ``round((w - min) / (max - min) * (2**bits_g - 1))`` per group, clamped into
    ``[0, 2**bits_g - 1]`` (int32, flat). In place on one working buffer: the export calls it on
    slices of half a million weights, where fresh temporaries cost more than the arithmetic."""
    flat = weight.detach().reshape(-1).float()
    if high - low <= 0:  # constant tensor: every weight is exactly ``low``
        return torch.zeros(flat.numel(), dtype=torch.int32, device=flat.device)
    steps = torch.exp2(bits.float()) - 1
    work = torch.sub(flat, low).div_(high - low)
    for w_v, sl in _grouped(work, group_size):
        st = steps[sl].unsqueeze(1)
        w_v.mul_(st).round_().clamp_(min=0)
        torch.minimum(w_v, st, out=w_v)
    return work.to(torch.int32)


def grouped_dequantize(levels: torch.Tensor, bits: torch.Tensor, low: float, high: float,
                       group_size: int, out: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """``levels * ((max - min) / (2**bits_g - 1)) + min`` per group (float32, flat), into ``out``
    when given (the restore writes each slice into the result).

    The one dequantization used by both the eval forward and restore (bit-identical outputs).
    """
    steps = torch.exp2(bits.float()) - 1
    step = torch.tensor(high - low, dtype=torch.float32, device=levels.device) / steps
    low_t = torch.tensor(low, dtype=torch.float32, device=levels.device)
    if out is None:
        out = torch.empty(levels.numel(), dtype=torch.float32, device=levels.device)
    for (l_v, sl), (o_v, _) in zip(_grouped(levels, group_size), _grouped(out, group_size)):
        torch.mul(l_v, step[sl].unsqueeze(1), out=o_v)
        o_v.add_(low_t)
    return out


def _unused(buffer: torch.Tensor) -> bool:
    """Whether nothing but ``buffer`` itself holds its memory (no view, no ``.grad``, no autograd
    graph): the storage's use count, 2 with the temporary storage object of this call."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count is not None and count(buffer.untyped_storage()._cdata) <= 2


class _Buffers:
    """Flat buffers of one size reused across steps: a fresh allocation of several MB faults its
    pages in on every step, which costs more than the arithmetic on them. :meth:`take` hands out a
    view of a held buffer only when nothing else refers to its memory any more (see
    :func:`_unused`), so a reused buffer is never one still seen by a caller."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device, limit: int = 8):
        self.numel, self.dtype, self.device, self.limit = numel, dtype, device, limit
        self.held: tp.List[torch.Tensor] = []

    def take(self, dtype: tp.Optional[torch.dtype] = None) -> torch.Tensor:
        """A flat buffer of ``numel`` entries (uninitialized) that nobody else uses; a fresh one
        when ``dtype`` is not the pool's."""
        if dtype is not None and dtype != self.dtype:
            return torch.empty(self.numel, dtype=dtype, device=self.device)
        for buffer in self.held:
            if _unused(buffer):
                return buffer.view(-1)  # a new tensor on the memory: the count says it is in use
        buffer = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        if len(self.held) < self.limit:
            self.held.append(buffer)
        return buffer.view(-1)


class _Layout:
    """Where each tensor of a set of quantized tensors lives in one flat buffer, so that the whole
    set costs a few whole-buffer operations per step instead of a few operations per tensor.

    Tensor ``t`` (``n_t`` entries) starts at ``offsets[t]``, a multiple of ``align`` = lcm(row
    width, 256), and is followed by ``pads[t]`` copies of its first entry up to the next multiple
    (zero when its size is already one, as for most layers): blocks of 256 entries then hold one
    tensor each, for its min and max, and rows of ``width`` entries carry the group arithmetic,
    one row per group when ``group_size`` > 0 (the shorter remainder group is a row ending in
    padding), rows of 256 entries of one tensor when it is 0. Rows that only hold padding map to a
    dummy group (index ``n_groups``) whose value is never used.
    """

    def __init__(self, sizes: tp.Sequence[int], groups: tp.Sequence[int], group_size: int,
                 device: torch.device, dtype: torch.dtype):
        width = group_size if group_size > 0 else _BLOCK
        align = width * _BLOCK // math.gcd(width, _BLOCK)
        self.sizes, self.groups, self.width = list(sizes), list(groups), width
        self.pads = [-n % align for n in sizes]
        spans = [n + pad for n, pad in zip(sizes, self.pads)]
        self.offsets = [sum(spans[:i]) for i in range(len(spans))]
        self.total, self.n_groups = sum(spans), sum(groups)
        ids = torch.arange(len(sizes), device=device)
        blocks = ids.repeat_interleave(torch.tensor([s // _BLOCK for s in spans], device=device))
        self.block_tensor = torch.cat([blocks, blocks + len(sizes)])  # for the max, then the min
        self.block_index = torch.arange(2 * len(blocks), device=device)
        rows = [s // width for s in spans]
        if group_size == 0:  # each tensor is one group
            self.group_tensor = ids
            self.row_group: tp.Optional[torch.Tensor] = ids.repeat_interleave(torch.tensor(rows, device=device))
        else:
            self.group_tensor = ids.repeat_interleave(torch.tensor(groups, device=device))
            self.row_group = None
            if rows != list(groups):
                real = torch.ones(self.total // width, dtype=torch.bool, device=device)
                for offset, count, n_rows in zip(self.offsets, groups, rows):
                    real[offset // width + count:offset // width + n_rows] = False
                self.row_group = torch.full_like(real, self.n_groups, dtype=torch.long)
                self.row_group[real] = torch.arange(self.n_groups, device=device)
        # per-tensor sums/maxima of a per-group value: when every row is a group (no padding rows)
        # and a block of 256 entries holds whole groups, reduce each block's groups, then the
        # few blocks of each tensor (2 ops, not one per tensor)
        self.block_groups = _BLOCK // width if self.row_group is None and _BLOCK % width == 0 else 0
        self.tensor_of_block = blocks
        self.ones = torch.ones(width, dtype=dtype, device=device)  # row sums as a matrix-vector product
        lengths = torch.full((self.n_groups,), float(group_size), device=device)
        ends = torch.tensor(groups, device=device).cumsum(0) - 1
        lengths[ends] = torch.tensor([float(n - group_size * (count - 1)) for n, count in zip(sizes, groups)],
                                     device=device)  # the remainder group; the whole tensor at 0
        self.lengths = lengths  # entries of each group (the size term's weights)
        self.buffers = _Buffers(self.total, dtype, device)
        self.group_buffers = _Buffers(self.n_groups, torch.float32, device)  # logits are float32
        self.kept: tp.Optional[tp.Tuple[int, int, torch.Tensor]] = None  # see keep_sigmoid

    def sigmoid(self, logits: tp.Sequence[torch.Tensor]) -> torch.Tensor:
        """``sigmoid`` of the logits (one flat vector of all the groups, or one vector per tensor)
        in a flat buffer of our own."""
        out = self.group_buffers.take(logits[0].dtype)
        if len(logits) > 1:
            return torch.cat(logits, out=out).sigmoid_()
        return torch.sigmoid(logits[0], out=out)

    def keep_sigmoid(self, logits: tp.Sequence[torch.Tensor], sig: torch.Tensor) -> None:
        """Hand the noise forward's ``sigmoid(logits)`` to the size term of the same step (the
        logits have not changed in between: same memory, same version)."""
        self.kept = (logits[0].data_ptr(), logits[0]._version, sig) if len(logits) == 1 else None

    def kept_sigmoid(self, logits: tp.Sequence[torch.Tensor]) -> tp.Optional[torch.Tensor]:
        """The sigmoid kept by :meth:`keep_sigmoid` when it is still that of ``logits`` (once:
        the buffer goes back to the pool when its users are done)."""
        kept, self.kept = self.kept, None
        if kept is None or len(logits) != 1 or kept[:2] != (logits[0].data_ptr(), logits[0]._version):
            return None
        return kept[2]

    def split_groups(self, per_group: torch.Tensor, count: int) -> tp.Tuple[torch.Tensor, ...]:
        """A per-group gradient as the ``count`` logit inputs were given: whole (1) or per tensor."""
        return (per_group,) if count == 1 else tuple(per_group.split(self.groups))

    def flatten(self, tensors: tp.Sequence[torch.Tensor], pad_with_first: bool) -> torch.Tensor:
        """A flat buffer of our own (:class:`_Buffers`) holding ``tensors`` at their offsets;
        padding repeats each tensor's first entry (``pad_with_first``) or is zero."""
        parts = []
        for tensor, pad in zip(tensors, self.pads):
            flat = tensor.reshape(-1)
            parts.append(flat)
            if pad:
                parts.append(flat[:1].expand(pad) if pad_with_first else flat.new_zeros(pad))
        out = self.buffers.take()
        if len(parts) > 1:
            return torch.cat(parts, out=out)
        return out.copy_(parts[0])

    def split(self, flat: torch.Tensor, likes: tp.Sequence[torch.Tensor]) -> tp.List[torch.Tensor]:
        """Views of ``flat`` with the shapes of ``likes`` (inverse of :meth:`flatten`)."""
        return [flat[o:o + n].view_as(like) for o, n, like in zip(self.offsets, self.sizes, likes)]

    def per_row(self, per_group: torch.Tensor) -> torch.Tensor:
        """A per-group value repeated on each row of the group arithmetic."""
        if self.row_group is None:
            return per_group
        return torch.cat([per_group, per_group.new_zeros(1)]).index_select(0, self.row_group)

    def group_sums(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum over each group of a ``(rows, width)`` buffer."""
        if rows.dtype in (torch.float32, torch.float64):
            pooled = self.row_group is None and rows.shape[0] == self.n_groups
            sums = torch.mv(rows, self.ones, out=self.group_buffers.take(rows.dtype) if pooled else None)
        else:
            sums = rows.sum(1)
        if self.row_group is None:
            return sums
        return sums.new_zeros(self.n_groups + 1).index_add_(0, self.row_group, sums)[:self.n_groups]

    def per_tensor(self, per_group: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Sum (``reduce="amax"``: max) of a per-group value over each tensor's groups: through
        the blocks of 256 entries when they hold whole groups, else one vectorized reduction per
        tensor (a scatter over all the groups is several times slower)."""
        k = len(self.sizes)
        if self.block_groups:
            blocks = per_group.view(-1, self.block_groups)
            if reduce == "sum":
                return per_group.new_zeros(k).index_add_(0, self.tensor_of_block, blocks.sum(1))
            return per_group.new_full((k,), -math.inf).scatter_reduce_(
                0, self.tensor_of_block, blocks.amax(1), "amax")
        parts = per_group.split(self.groups)
        return torch.stack([part.sum() if reduce == "sum" else part.amax() for part in parts])

    def ranges(self, flat: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per tensor of ``flat`` (as :meth:`flatten` lays it out): min, max, and the flat indices
        of the first arg-max then of the first arg-min (``2k``; as torch's argmax/argmin)."""
        blocks = flat.view(-1, _BLOCK)
        n_blocks, k = blocks.shape[0], len(self.sizes)
        # the max of a tensor is minus the min of its negated entries: one reduction for both
        # (amin/amax over rows of 256 are fast paths, aminmax(dim) is not)
        tops = torch.cat([blocks.amax(1).neg_(), blocks.amin(1)])
        best = tops.new_full((2 * k,), math.inf).scatter_reduce_(0, self.block_tensor, tops, "amin")
        hits = torch.where(tops == best.index_select(0, self.block_tensor), self.block_index, 2 * n_blocks)
        first = hits.new_full((2 * k,), 2 * n_blocks).scatter_reduce_(0, self.block_tensor, hits, "amin")
        first.remainder_(n_blocks)  # the block (2·n_blocks, no hit, only happens with a NaN weight)
        inside = blocks.index_select(0, first)
        inside[:k].neg_()
        return best[k:], best[:k].neg(), first * _BLOCK + inside.argmin(1)


class _PseudoQuantNoise(torch.autograd.Function):
    """``w + c·Δ_g·u`` with ``Δ_g = scale_t / (2**bits_g - 1)`` for every tensor ``t`` of a set at
    once (:class:`_Layout`), gradients to the weights and the logits.

    Inputs: the layout, ``(min_bits, span, coef, noise kind)``, the fixed noise per tensor (or
    None: one fresh draw for the whole set), then the ``k`` weights and their logits: one flat
    vector of all the groups in layout order (the quantizer's own flat parameter: no copy, one
    gradient) or ``k`` vectors. Returns the ``k`` noisy weights (views of one buffer).
    """

    @staticmethod
    def forward(ctx, layout, config, fixed, *tensors):
        min_bits, span, coef, noise = config
        k = len(layout.sizes)  # no grad is recorded in here: the inputs need no detach
        weights, logits = tensors[:k], tensors[k:]
        flat = layout.flatten(weights, pad_with_first=True)
        low, high, extremes = layout.ranges(flat)
        scale = high - low  # per tensor
        sig = layout.sigmoid(logits)
        if fixed is None:
            layout.keep_sigmoid(logits, sig)
        # den = 2**bits - 1, Δ = c·scale/den: in place on buffers of our own (fewer passes)
        den = torch.mul(sig, span, out=layout.group_buffers.take(sig.dtype)).add_(min_bits).exp2_().sub_(1)
        delta = torch.index_select(scale * coef, 0, layout.group_tensor, out=layout.group_buffers.take(scale.dtype))
        delta.div_(den)
        if fixed is not None:
            u = layout.flatten([f.to(flat) for f in fixed], pad_with_first=False)
        else:
            u = fill_noise(layout.buffers.take(), noise)
        # in place: the copy of the weights is not needed afterwards, and one buffer fewer in the
        # step's working set leaves the cache to the model (the float ops of the step ran slower
        # with one more 4-byte-per-weight buffer)
        width = layout.width
        flat.view(-1, width).addcmul_(u.view(-1, width), layout.per_row(delta).unsqueeze(1))
        ctx.u, ctx.layout, ctx.config, ctx.n_logits = u, layout, config, len(logits)
        ctx.save_for_backward(sig, den, delta, extremes)
        return tuple(layout.split(flat, weights))

    @staticmethod
    def backward(ctx, *grad_outs):
        sig, den, delta, extremes = ctx.saved_tensors
        layout, (_, span, coef, _) = ctx.layout, ctx.config
        u = ctx.u
        if u is None:
            raise RuntimeError("DiffQ noise: backward ran twice through the same forward "
                               "(retain_graph is not supported by the pseudo-quantization noise)")
        ctx.u = None
        grad = layout.flatten(grad_outs, pad_with_first=False)  # ours: returned as the weight grads
        u.mul_(grad)  # u is ours and not needed afterwards: reuse it for grad·u
        grad_delta = layout.group_sums(u.view(-1, layout.width)).to(den.dtype)  # ∂L/∂Δ
        del u  # back to the buffers
        # Δ = c·scale/den, den = 2**bits - 1, bits = min + span·sigmoid(logit), so
        # ∂Δ/∂scale = c/den and ∂Δ/∂logit = -Δ/den · (den + 1)·ln 2·span·sig·(1 - sig)
        grad_delta.div_(den)
        grad_scale = layout.per_tensor(grad_delta).mul_(coef)
        grad_delta.mul_(sig).addcmul_(grad_delta, sig, value=-1)  # · sig·(1 - sig)
        grad_delta.mul_(delta).addcmul_(grad_delta, den)  # · Δ·(den + 1)
        grad_logits = grad_delta.mul_(-math.log(2) * span)
        # the range max - min: its gradient goes to the first arg-max (+) and arg-min (-) entries
        grad.index_add_(0, extremes, torch.cat([grad_scale, -grad_scale]).to(grad.dtype))
        return (None, None, None, *layout.split(grad, grad_outs),
                *layout.split_groups(grad_logits, ctx.n_logits))


class _SizeTerm(torch.autograd.Function):
    """``scale`` times the size in MiB of a set of tensors from their logits, one node:
    ``scale · (Σ_g len_g · bits_g + header(tops)) / 8 / MB``, ``bits_g = min_bits + span ·
    sigmoid(logit_g)``, ``tops`` the largest bits of each tensor (the header, a constant of the
    size, follows them). Inputs: the layout, ``min_bits``, ``span``, ``header``, ``scale`` (λ for
    the penalty), then the logit vectors. ``Σ len_g · bits_g`` is computed as ``min_bits · N +
    span · Σ len_g · sigmoid_g`` (one dot product; the sigmoid is the noise forward's when the
    logits have not changed since)."""

    @staticmethod
    def forward(ctx, layout, min_bits, span, header, scale, *logits):
        sig = layout.kept_sigmoid(logits)  # no grad is recorded in here
        if sig is None:
            sig = layout.sigmoid(logits)
        tops = layout.per_tensor(sig, "amax").mul_(span).add_(min_bits).tolist()  # as get_bits
        ctx.layout, ctx.factor, ctx.n_logits = layout, scale * span / 8 / MB, len(logits)
        ctx.save_for_backward(sig)
        constant = (min_bits * sum(layout.sizes) + header(tops)) * scale / 8 / MB
        return torch.dot(sig, layout.lengths).mul_(ctx.factor).add_(constant)

    @staticmethod
    def backward(ctx, grad_out):
        sig, = ctx.saved_tensors
        grad = torch.addcmul(sig, sig, sig, value=-1, out=ctx.layout.group_buffers.take(sig.dtype))  # sig·(1 - sig)
        grad.mul_(ctx.layout.lengths).mul_(grad_out * ctx.factor)
        return (None, None, None, None, None, *ctx.layout.split_groups(grad, ctx.n_logits))


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
        # every group's logit in one parameter, tensor after tensor in qparams order: the train
        # step hands it whole to the noise and size nodes (no copy, one gradient, one optimizer
        # tensor); each tensor's logits are a slice of it (:meth:`_logit`)
        qps = self.qparams
        counts = [self._num_groups(qp) for qp in qps]
        self._logit_slices = {qp.name: (sum(counts[:i]), n) for i, (qp, n) in enumerate(zip(qps, counts))}
        device = qps[0].param.device if qps else None
        self.logit: nn.Parameter = nn.Parameter(torch.full((sum(counts),), logit0, device=device))
        self._all = qps  # the quantized tensors (first occurrences), in the order of the logits
        prepare_noise(device)
        self._layouts: tp.Dict[tp.Any, _Layout] = {}
        self._bits_lo = int(round(min_bits))
        self._bits_hi = int(round(max_bits))

    # ------------------------------------------------------------------------------ helpers
    def _num_groups(self, qp: QParam) -> int:
        n = qp.param.numel()
        return 1 if self.group_size == 0 else -(-n // self.group_size)

    def _flat_logit(self) -> nn.Parameter:
        """:attr:`logit`, on the device of the quantized weights (moved with the model)."""
        qps = self._all
        if qps and self.logit.device != qps[0].param.device:  # model moved after the quantizer was built
            self.logit.data = self.logit.data.to(qps[0].param.device)
        return self.logit

    def logit_slice(self, qp: QParam) -> slice:
        """Where ``qp``'s group logits are in :attr:`logit` (and in its ``.grad``)."""
        start, count = self._logit_slices[qp.name]
        return slice(start, start + count)

    def _logit(self, qp: QParam) -> torch.Tensor:
        """The logits of ``qp``'s groups: a slice of :attr:`logit` (differentiable)."""
        return self._flat_logit()[self.logit_slice(qp)]

    @property
    def logits(self) -> tp.Dict[str, torch.Tensor]:
        """Each quantized tensor's logits by name (slices of :attr:`logit`, sharing its memory)."""
        return {qp.name: self._logit(qp) for qp in self.qparams}

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
    def setup_optimizer(self, optimizer: torch.optim.Optimizer, lr: tp.Optional[float] = None,
                        separate_adam: bool = False, **kwargs: tp.Any) -> tp.List[torch.optim.Optimizer]:
        """As :meth:`BaseQuantizer.setup_optimizer`; the logits' group (one flat tensor) uses the
        optimizer's fused implementation where it has one (Adam, AdamW, SGD: one kernel instead of
        a dozen whole-tensor ops; the same update up to float rounding), else its multi-tensor
        (``foreach``) one, unless ``foreach`` or ``fused`` is given."""
        defaults = optimizer.defaults if not separate_adam else {"fused": None, "foreach": None}
        if "foreach" not in kwargs and "fused" not in kwargs and not defaults.get("differentiable"):
            device = self.logit.device.type
            if "fused" in defaults and device in ("cpu", "cuda"):
                kwargs["fused"] = True
            elif "foreach" in defaults:
                kwargs["foreach"] = True
        return super().setup_optimizer(optimizer, lr=lr, separate_adam=separate_adam, **kwargs)

    def quantizer_parameters(self) -> tp.List[nn.Parameter]:
        return [self._flat_logit()] if self.qparams else []

    def state_dict(self) -> tp.Dict[str, tp.Any]:
        """The logits, one tensor per quantized tensor (qparams order)."""
        with torch.no_grad():
            return {"params": [self._logit(qp).cpu().clone() for qp in self.qparams]}

    def load_state_dict(self, state: tp.Dict[str, tp.Any]) -> None:
        with torch.no_grad():
            load_tensors([self._logit(qp) for qp in self.qparams], state.get("params", []), self.name)

    def _layout(self, qps: tp.Sequence[QParam], device: torch.device, dtype: torch.dtype) -> _Layout:
        key = ("all" if qps is self._all else tuple(id(qp) for qp in qps), device, dtype)
        layout = self._layouts.get(key)
        if layout is None:
            layout = _Layout([qp.param.numel() for qp in qps], [self._num_groups(qp) for qp in qps],
                             self.group_size, device, dtype)
            self._layouts[key] = layout
        return layout

    def _train_values(self, qps: tp.Sequence[QParam]) -> tp.List[torch.Tensor]:
        return self.noisy_weights(qps)

    def _train_value(self, qp: QParam, fixed_noise: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.noisy_weights([qp], None if fixed_noise is None else [fixed_noise])[0]

    def noisy_weights(self, qps: tp.Sequence[QParam],
                      fixed_noise: tp.Optional[tp.Sequence[torch.Tensor]] = None) -> tp.List[torch.Tensor]:
        """The train-mode (noisy) weights of ``qps``, all computed together: one noise draw for the
        whole set (in this order), one autograd node (see :class:`_PseudoQuantNoise`).

        Args:
            qps: the parameters (first occurrences).
            fixed_noise: one N(0, 1) / U(-½, ½) tensor per parameter instead of a fresh draw (tests).
        Returns:
            the noisy weights, in the order of ``qps``.
        """
        config = (float(self.min_bits), float(self.max_bits - self.min_bits), NOISES[self.noise], self.noise)
        everything = self._all
        if not qps:
            return []
        if len(qps) == len(everything) and all(a is b for a, b in zip(qps, everything)):  # usual
            device = everything[0].param.device
            if all(qp.param.device == device and qp.param.dtype == everything[0].param.dtype for qp in qps):
                return list(_PseudoQuantNoise.apply(
                    self._layout(everything, device, everything[0].param.dtype), config,
                    None if fixed_noise is None else list(fixed_noise),
                    *(qp.param for qp in everything), self._flat_logit()))
        elif len(qps) == len(everything) and {id(qp) for qp in qps} == {id(qp) for qp in everything}:
            # the whole model in another order (a forward's module order): in qparams order the
            # logits are the flat parameter itself
            order = {id(qp): i for i, qp in enumerate(qps)}
            values = self.noisy_weights(everything, None if fixed_noise is None else
                                        [fixed_noise[order[id(qp)]] for qp in everything])
            by_id = {id(qp): value for qp, value in zip(everything, values)}
            return [by_id[id(qp)] for qp in qps]
        sets: tp.Dict[tp.Any, tp.List[int]] = {}  # one set per device and dtype (usually one)
        for i, qp in enumerate(qps):
            sets.setdefault((qp.param.device, qp.param.dtype), []).append(i)
        out: tp.List[tp.Optional[torch.Tensor]] = [None] * len(qps)
        for (device, dtype), members in sets.items():
            chosen = [qps[i] for i in members]
            fixed = None if fixed_noise is None else [fixed_noise[i] for i in members]
            # a subset (the whole set in qparams order on one device and dtype was handled above):
            # its slices of the flat logits
            values = _PseudoQuantNoise.apply(self._layout(chosen, device, dtype), config, fixed,
                                             *(qp.param for qp in chosen), *(self._logit(qp) for qp in chosen))
            for i, value in zip(members, values):
                out[i] = value
        return tp.cast(tp.List[torch.Tensor], out)

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
        # the eval levels (grouped_levels as :meth:`_quantize`; base.export has checked the weight is
        # finite), computed slice by slice as the packing asks for them (a slice is whole groups)
        on_device = self.eval_bits(qp)
        low, high = tensor_range(qp.param)
        flat, g = qp.param.detach().reshape(-1), self.group_size or qp.param.numel()

        def levels(start: int, stop: int) -> torch.Tensor:
            return grouped_levels(flat[start:stop], on_device[start // g:-(-stop // g)], low, high,
                                  self.group_size)

        bits = on_device.cpu()
        codes = bits - self._bits_lo
        # the width of the codes of this tensor: its largest code fits (= bits_bits(...) of the
        # size accounting for an integer min_bits; one more bit at most for a fractional one)
        width = _code_width(int(codes.max()))
        return {"shape": list(qp.param.shape), "min": low, "max": high,
                "group_size": self.group_size, "bits_lo": self._bits_lo, "bits_bits": width,
                "bits": pack_uint(codes, width) if width else torch.zeros(0, dtype=torch.uint8),
                # each level is clamped into [0, 2**bits - 1]: no range check needed
                "levels": pack_groups(levels, bits, self.group_size, count=flat.numel(), check=False)}

    @classmethod
    def _restore_param(cls, entry: tp.Dict[str, tp.Any], like: torch.Tensor) -> torch.Tensor:
        n, g = like.numel(), int(entry["group_size"])
        groups = 1 if g == 0 else -(-n // g)
        nb = int(entry["bits_bits"])
        codes = unpack_uint(entry["bits"], nb, groups) if nb else torch.zeros(groups, dtype=torch.long)
        bits = codes + int(entry["bits_lo"])
        low, high, width = entry["min"], entry["max"], g or n

        def dequantize(levels: torch.Tensor, start: int, out: torch.Tensor) -> None:  # whole groups
            stop = start + levels.numel()
            grouped_dequantize(levels, bits[start // width:-(-stop // width)], low, high, g, out=out)

        try:
            out = unpack_groups(entry["levels"], bits, n, g, dtype=torch.float32, apply=dequantize)
        except ValueError as exc:
            raise QuantizerError(f"DiffQ levels: {exc}") from None
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
        return self._bits_bits_of(float(bits.detach().max()))

    def _bits_bits_of(self, top: float) -> int:
        codes = 1 + round(top) - self.min_bits
        return max(0, math.ceil(math.log2(codes))) if codes > 1 else 0

    def model_size(self) -> torch.Tensor:
        """Size in MiB, differentiable in the logits: one size term over all quantized tensors
        (``Σ len_g · bits_g`` as one dot product, the per-tensor constants added once; one autograd
        node, :class:`_SizeTerm`)."""
        return self._size(1.0)

    def _size(self, scale: float) -> torch.Tensor:
        """``scale`` · :meth:`model_size` (the penalty's λ folded into the size node)."""
        qps = self._all
        if not qps or len({(qp.param.device, qp.param.dtype) for qp in qps}) > 1:
            return scale * super().model_size()
        logit = self._flat_logit()
        layout = self._layout(qps, logit.device, qps[0].param.dtype)
        float_bits = sum(p.numel() for _, p in self._float_params) * (16 if self.float16 else 32)

        def header(tops: tp.List[float]) -> int:  # per tensor: range, bits_lo, widths; the floats
            widths = sum(self._bits_bits_of(top) * groups for top, groups in zip(tops, layout.groups))
            return (64 + 8) * len(tops) + widths + float_bits

        return _SizeTerm.apply(layout, float(self.min_bits), float(self.max_bits - self.min_bits), header,
                              float(scale), logit)

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
        return self._size(self.penalty)
