"""Exact bit packing of unsigned integers.

Layout of :func:`pack_uint`: value ``i`` occupies bits ``[i*nbits, (i+1)*nbits)`` of a
little-endian bit stream (bit ``j`` of the stream is bit ``j % 8`` of byte ``j // 8``). The result
is exactly ``ceil(n * nbits / 8)`` bytes: no per-width padding, any width 1..16.

:func:`pack_groups` stores values that come in groups with one width per group (DiffQ's export):
for each width present, in ascending order, the :func:`pack_uint` stream of the values of all
groups of that width (groups in order, the shorter remainder group last). Exactly
``Σ_w ceil(count_w * w / 8)`` bytes.

How, with no Python loop over values or groups and no ``n x nbits`` bit matrix: eight consecutive
values of ``w`` bits fill exactly ``w`` bytes, a 128-bit little-endian block held in two int64
words, built by merging neighbouring fields (8 x w -> 4 x 2w -> 2 x 4w -> 8w bits), one vectorized
shift or multiply-add per merge, ``w`` a number (:func:`pack_uint`) or one per group
(:func:`pack_groups`); unpacking runs the merges backwards. When the group size is a multiple of
8, every whole group fills whole bytes at any width, so a width's stream is the concatenation of
its groups' blocks: the groups are coded in their own order and only the blocks (at most 2 bytes
per value) are sorted by width, with one stable radix sort of one byte per group. Work goes in
slices of ``_SLICE_VALUES`` values whose intermediates stay in cache (and never allocate large
temporaries, each of which costs a page fault per 4 KiB); a caller can produce the values to
pack, or consume the unpacked ones, slice by slice (DiffQ quantizes and dequantizes there).

:func:`pack_mixed_radix` stores integers in ``[0, L)`` for any ``L`` (fractional bit widths):
``k`` values are merged into one base-``L`` word of ``ceil(k*log2 L)`` bits, ``k`` chosen to
minimize the bits per value (within 1% of ``log2 L`` for the widths used in practice).
"""
from __future__ import annotations

import math
import sys
import typing as tp

import numpy as np
import torch

MAX_BITS = 16
_MAX_WORD_BITS = 62  # base-L words stay below 2**63 (signed int64 arithmetic)
_SLICE_VALUES = 1 << 19  # values per slice of the block coding (a multiple of 8; its int64
# temporaries, a few MiB, stay in cache; fewer slices mean fewer calls, each ~10 us)
_LITTLE = sys.byteorder == "little"  # blocks are read as the bytes of int64 words
Width = tp.Union[int, torch.Tensor]  # one width, or one per row as an (m, 1) int64 column
#: the values ``[start, stop)`` to pack (whole groups), or the tensor itself
Source = tp.Union[torch.Tensor, tp.Callable[[int, int], torch.Tensor]]
#: ``apply(levels, start, out)``: writes into ``out`` what the unpacked result holds for the values
#: ``[start, start + len(levels))`` (whole groups)
Sink = tp.Callable[[torch.Tensor, int, torch.Tensor], None]


def _check_nbits(nbits: int) -> int:
    if isinstance(nbits, bool) or int(nbits) != nbits or not 1 <= nbits <= MAX_BITS:
        raise ValueError(f"nbits must be an integer in [1, {MAX_BITS}], got {nbits!r}")
    return int(nbits)


def _check_count(count: int) -> int:
    if isinstance(count, bool) or int(count) != count or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    return int(count)


def _check_packed(packed: torch.Tensor, nbytes: int, what: str) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed data must be a 1-D uint8 tensor, got "
                         f"{getattr(packed, 'dtype', type(packed).__name__)} with shape "
                         f"{tuple(getattr(packed, 'shape', ()))}")
    if packed.numel() != nbytes:
        raise ValueError(f"packed data holds {packed.numel()} bytes, expected {nbytes} for {what} "
                         "(truncated or corrupt state)")


def _integers(values: torch.Tensor) -> torch.Tensor:
    values = values.reshape(-1)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"values to pack must be an integer tensor, got {values.dtype}")
    return values


# ----------------------------------------------------------------------------- block coding
def _ones(bits: int) -> int:
    """The low ``bits`` bits set (``bits`` in 0..64), as an int64 value: -1 for 64."""
    return -1 if bits >= 64 else (1 << bits) - 1


def _take_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rows[index]`` along dim 0 (numpy's take is about twice torch's index_select on CPU rows)."""
    if rows.device.type == "cpu":
        return torch.from_numpy(np.take(rows.numpy(), index.numpy(), axis=0))
    return rows.index_select(0, index)


class _Consts(tp.NamedTuple):
    """Per-width constants of the block coding: ints for one width, ``(m, 1)`` int64 columns for
    one width per row."""
    w: Width
    w2: Width  # shift between the two fields of a quad
    w4: Width  # shift between the two quads of a block
    r4: Width  # 64 - 4w: where the high quad continues in the high word
    ones4: Width
    ones64: Width  # low 64 - 4w bits
    ones2: Width
    spread: Width  # 2**32 - 2**w: moves a pair's high field between bit w and bit 32
    wide: bool  # some width is 16: a quad fills its int64 (negative)

    @classmethod
    def of(cls, w: int) -> "_Consts":
        return cls(w, 2 * w, 4 * w, 64 - 4 * w, _ones(4 * w), _ones(64 - 4 * w), _ones(2 * w),
                   (1 << 32) - (1 << w), w > 15)

    @classmethod
    def per_row(cls, widths: torch.Tensor) -> "_Consts":
        """``(m, 1)`` columns of the constants for rows of the given widths: one lookup in a
        ``(constants, widths)`` table (each constant's column comes out contiguous)."""
        table = _TABLES.get(widths.device)
        if table is None:
            table = _TABLES[widths.device] = torch.tensor(
                [[getattr(cls.of(w), name) for w in range(MAX_BITS + 1)] for name in cls._fields[:-1]],
                dtype=torch.long, device=widths.device)
        cols = table.index_select(1, widths)
        return cls(*(col.view(-1, 1) for col in cols), int(widths.max()) > 15)


_TABLES: tp.Dict[torch.device, torch.Tensor] = {}


def _encode_blocks(rows: torch.Tensor, k: _Consts,
                   out: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(m, 8j)`` int32 values -> ``(m, 2j)`` int64 (``out`` if given): entries ``2b``, ``2b + 1``
    of a row are the low and high word of its block ``b``, the 128-bit little-endian number whose
    first ``w`` bytes are :func:`pack_uint`'s bytes for its 8 values."""
    m, c = rows.shape
    if not rows.is_contiguous() or rows.storage_offset() % 2:
        rows = rows.clone()  # the int64 view needs an aligned, contiguous tensor
    x = rows.view(torch.long)  # v0 + v1 * 2**32 for each pair of neighbours (little-endian)
    high = x >> 32
    pair = torch.sub(x, high.mul_(k.spread), out=high).view(m, c // 4, 2)  # v0 + v1 * 2**w
    quad = (pair[..., 1] << k.w2).bitwise_or_(pair[..., 0]).view(m, c // 8, 2)  # 4w bits
    if out is None:
        out = torch.empty(m, c // 4, dtype=torch.long, device=rows.device)
    words = out.view(m, c // 8, 2)
    torch.bitwise_or(quad[..., 0], quad[..., 1] << k.w4, out=words[..., 0])  # bits 0..63 (wraps)
    torch.bitwise_right_shift(quad[..., 1], k.r4, out=words[..., 1])  # bits 64..8w-1
    return out


def _decode_blocks(words: torch.Tensor, k: _Consts, out: torch.Tensor) -> None:
    """Inverse of :func:`_encode_blocks` into ``out`` (``(m, 8j)`` int32, contiguous, 8-byte
    aligned); the bytes of a block past its ``w`` must be zero."""
    m, c = words.shape
    blocks = words.view(m, c // 2, 2)
    lo, hi = blocks[..., 0], blocks[..., 1]
    quad = torch.empty(m, c // 2, 2, dtype=torch.long, device=words.device)
    torch.bitwise_and(lo, k.ones4, out=quad[..., 0])
    # lo >> 4w is arithmetic: keep its 64 - 4w low bits, then add the bits carried into hi
    high = (lo >> k.w4).bitwise_and_(k.ones64)
    torch.bitwise_or(high, hi << k.r4, out=quad[..., 1])
    quad = quad.view(m, c)
    pair = torch.empty(m, c, 2, dtype=torch.long, device=words.device)
    torch.bitwise_and(quad, k.ones2, out=pair[..., 0])
    torch.bitwise_right_shift(quad, k.w2, out=pair[..., 1])
    if k.wide:  # a 64-bit quad is negative: mask the sign bits out of its high field
        pair[..., 1].bitwise_and_(k.ones2)
    pair = pair.view(m, 2 * c)
    # each pair v0 + v1 * 2**w becomes the two int32 v0, v1 of out: v0 + v1 * 2**32
    torch.mul(pair >> k.w, k.spread, out=out.view(torch.long)).add_(pair)


def _pack_bytes_portable(rows: torch.Tensor, nbits: int) -> torch.Tensor:
    """Big-endian hosts: the ``nbits`` bytes of each row of 8 values, one byte at a time (byte
    ``k`` is an OR of the shifted values that overlap bits ``8k..8k+7``)."""
    out = torch.zeros(rows.shape[0], nbits, dtype=torch.int32, device=rows.device)
    rows = rows.to(torch.int32)
    for i in range(8):
        for k in range(nbits):
            shift = 8 * k - i * nbits
            if -8 < shift < nbits:
                out[:, k] |= (rows[:, i] >> shift if shift >= 0 else rows[:, i] << -shift) & 0xFF
    return out.to(torch.uint8)


def _unpack_bytes_portable(data: torch.Tensor, nbits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bytes_portable`: ``(m, nbits)`` bytes -> ``(m, 8)`` int32."""
    data = data.to(torch.int32)
    out = torch.zeros(data.shape[0], 8, dtype=torch.int32, device=data.device)
    for i in range(8):
        for k in range(nbits):
            shift = 8 * k - i * nbits
            if -8 < shift < nbits:
                out[:, i] |= data[:, k] << shift if shift >= 0 else data[:, k] >> -shift
    return out & ((1 << nbits) - 1)


# ----------------------------------------------------------------------------- one width
def _check_values(flat: torch.Tensor, nbits: int) -> None:
    if flat.numel():
        low, high = torch.aminmax(flat)
        if int(low) < 0 or int(high) >= 2 ** nbits:
            raise ValueError(f"values to pack must be in [0, {2 ** nbits - 1}] for nbits={nbits}, "
                             f"got range [{int(low)}, {int(high)}]")


def _pack_slice(values: torch.Tensor, nbits: int, dest: torch.Tensor) -> None:
    """Pack integers (a slice starting on a multiple of 8 values) into ``dest``, their
    ``ceil(len * nbits / 8)`` bytes."""
    n = values.numel()
    if nbits == 8:
        dest.copy_(values)
        return
    m = (n + 7) // 8
    rows = values
    if n < 8 * m or rows.dtype != torch.int32:
        rows = torch.zeros(8 * m, dtype=torch.int32, device=values.device)
        rows[:n] = values
    rows = rows.view(m, 8)
    if _LITTLE:
        block_bytes = _encode_blocks(rows, _Consts.of(nbits)).view(torch.uint8)[:, :nbits]
    else:
        block_bytes = _pack_bytes_portable(rows, nbits)
    if dest.numel() == m * nbits:
        dest.view(m, nbits).copy_(block_bytes)
    else:  # the last block is partial
        dest.copy_(block_bytes.reshape(-1)[:dest.numel()])


def _unpack_slices(packed: torch.Tensor, nbits: int, count: int, step: int
                   ) -> tp.Iterator[tp.Tuple[int, torch.Tensor]]:
    """``(start, int32 values)`` for slices of ``step`` values (a multiple of 8) of the stream; the
    values are a buffer the next slice reuses."""
    if nbits == 8:
        for a in range(0, count, step):
            yield a, packed[a:a + step].to(torch.int32)
        return
    if count == 0:
        return
    step = 8 * ((min(step, count) + 7) // 8)  # slices start on whole blocks
    blocks = torch.zeros(step // 8, 16, dtype=torch.uint8, device=packed.device)
    values = torch.empty(step // 8, 8, dtype=torch.int32, device=packed.device)
    consts = _Consts.of(nbits)
    for a in range(0, count, step):
        b = min(a + step, count)
        m, data = (b - a + 7) // 8, packed[a // 8 * nbits:(b * nbits + 7) // 8]
        whole = data.numel() // nbits  # the last block may be partial
        blocks[:whole, :nbits] = data[:whole * nbits].view(whole, nbits)
        if whole < m:  # its missing bytes read as zero (columns past nbits always are)
            blocks[whole].zero_()
            blocks[whole, :data.numel() - whole * nbits] = data[whole * nbits:]
        if _LITTLE:
            _decode_blocks(blocks[:m].view(torch.long), consts, values[:m])
        else:
            values[:m] = _unpack_bytes_portable(blocks[:m, :nbits], nbits)
        yield a, values.view(-1)[:b - a]


def pack_uint(values: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack non-negative integers of ``nbits`` bits each into a dense byte stream.

    Args:
        values: integer tensor of any shape (flattened in C order), entries in ``[0, 2**nbits)``.
        nbits: bit width, an integer in 1..16.
    Returns:
        a 1-D ``uint8`` tensor (on ``values``' device) of exactly ``ceil(numel * nbits / 8)`` bytes.
    Raises:
        ValueError: bad ``nbits``, a non-integer tensor, or a value out of range.
    """
    nbits = _check_nbits(nbits)
    flat = _integers(values)
    _check_values(flat, nbits)
    n = flat.numel()
    out = torch.empty((n * nbits + 7) // 8, dtype=torch.uint8, device=flat.device)
    for a in range(0, n, _SLICE_VALUES):
        b = min(a + _SLICE_VALUES, n)
        _pack_slice(flat[a:b], nbits, out[a // 8 * nbits:(b * nbits + 7) // 8])
    return out


def unpack_uint(packed: torch.Tensor, nbits: int, count: int,
                dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Inverse of :func:`pack_uint`.

    Args:
        packed: the ``uint8`` tensor returned by :func:`pack_uint`.
        nbits: the bit width used to pack (1..16).
        count: how many values were packed.
        dtype: integer dtype of the result (int32 halves the memory traffic of large restores).
    Returns:
        a 1-D tensor of ``count`` values (``int64`` by default).
    Raises:
        ValueError: bad arguments, or ``packed`` not of the exact expected length.
    """
    nbits = _check_nbits(nbits)
    count = _check_count(count)
    _check_packed(packed, (count * nbits + 7) // 8, f"{count} values of {nbits} bits")
    out = torch.empty(count, dtype=dtype, device=packed.device)
    for a, values in _unpack_slices(packed, nbits, count, _SLICE_VALUES):
        out[a:a + values.numel()] = values
    return out


# ----------------------------------------------------------------------------- per-group widths
class _Groups(tp.NamedTuple):
    """``count`` values in groups of ``g``: ``n_full`` whole groups of ``widths`` (int64), then a
    shorter remainder of ``rem`` values of width ``tail_width`` (-1 if none); ``counts[w]`` whole
    groups of width ``w``, listed by width (stable) in ``order``."""
    g: int
    n_full: int
    rem: int
    tail_width: int
    widths: torch.Tensor
    counts: tp.List[int]
    order: torch.Tensor

    def sizes(self) -> tp.List[int]:
        """Values of each width 0..16 (the remainder counted in its width)."""
        return [c * self.g + (self.rem if w == self.tail_width else 0) for w, c in enumerate(self.counts)]

    def nbytes(self) -> int:
        return sum((c * w + 7) // 8 for w, c in enumerate(self.sizes()))

    def blocks(self) -> bool:
        """Whether the block coding applies (whole blocks per group, little-endian words)."""
        return self.g % 8 == 0 and _LITTLE and self.n_full > 0


def _groups(widths: torch.Tensor, count: int, group_size: int) -> _Groups:
    g = group_size or max(count, 1)
    n_full, rem = count // g, count % g
    n_groups = n_full + (1 if rem else 0)
    if not isinstance(widths, torch.Tensor) or widths.dim() != 1 or widths.numel() != n_groups:
        raise ValueError(f"{count} values in groups of {group_size} need {n_groups} widths, got "
                         f"shape {tuple(getattr(widths, 'shape', ()))}")
    widths = widths.long()
    if widths.numel() and (int(widths.min()) < 1 or int(widths.max()) > MAX_BITS):
        raise ValueError(f"group widths must be in [1, {MAX_BITS}], got range "
                         f"[{int(widths.min())}, {int(widths.max())}]")
    full = widths[:n_full]
    counts = torch.bincount(full, minlength=MAX_BITS + 1).tolist() if n_full else [0] * (MAX_BITS + 1)
    keys = full.to(torch.uint8)
    if keys.device.type == "cpu":  # numpy's stable sort of bytes is a radix sort: several times faster
        order = torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    else:
        order = torch.sort(keys, stable=True).indices
    return _Groups(g, n_full, rem, int(widths[-1]) if rem else -1, full, counts, order)


def _span(group_size: int, count: int) -> int:
    """Values per slice of whole groups (a multiple of 8 too): the whole tensor for one group."""
    if group_size <= 0:
        return max(count, 1)
    unit = 8 * group_size // math.gcd(8, group_size)
    return max(1, _SLICE_VALUES // unit) * unit


def _check_group_range(rows: torch.Tensor, widths: torch.Tensor, first: int) -> None:
    """Every value of row ``j`` in ``[0, 2**widths[j])``: ``value >> width`` is 0 for all of them
    exactly (one shift and one min/max, in the values' own integer type)."""
    over = rows >> (widths if rows.dtype == torch.long else widths.to(rows.dtype)).view(-1, 1)
    low, top = torch.aminmax(over)
    if int(low) or int(top):  # an out-of-range level would spill into its neighbours' bits
        j = int(torch.nonzero(over.ne(0).any(dim=1))[0])
        raise ValueError(f"levels to pack must be in [0, 2**width) of their group: group {first + j} "
                         f"(width {int(widths[j])}) holds values in [{int(rows[j].min())}, "
                         f"{int(rows[j].max())}]")


def pack_groups(levels: Source, widths: torch.Tensor, group_size: int,
                count: tp.Optional[int] = None, check: bool = True) -> torch.Tensor:
    """Pack values that come in groups of ``group_size`` with one bit width per group.

    Layout: for each width present, ascending, :func:`pack_uint` of the values of all groups of
    that width concatenated (groups in order; the shorter remainder group, when ``group_size`` does
    not divide the count, last in its width). Exactly ``Σ_w ceil(count_w * w / 8)`` bytes.

    Args:
        levels: integer tensor (flattened in C order), group ``j``'s entries in
            ``[0, 2**widths[j])``; or a function ``levels(start, stop)`` returning the values
            ``[start, stop)``, whole groups, asked for in slices of a few MiB (a caller that
            computes them, e.g. by quantizing, then works on data in cache). A function needs
            ``count``.
        widths: one width per group, integers in 1..16 (the last group may be shorter).
        group_size: values per group; 0 means a single group.
        count: number of values (default: ``levels.numel()``).
        check: verify that every level fits its group's width (one shift and one min/max per
            slice, ~10% of the packing); False only where that holds by construction (DiffQ's
            levels are clamped to it), never for values read from outside.
    Returns:
        a 1-D ``uint8`` tensor on the CPU.
    Raises:
        ValueError: widths of the wrong length or out of range, or a level out of its group's range.
    """
    if isinstance(levels, torch.Tensor):
        flat = levels.reshape(-1)
        if count is not None and count != flat.numel():
            raise ValueError(f"pack_groups: count={count} but levels hold {flat.numel()} values")
        count = flat.numel()
        source: tp.Callable[[int, int], torch.Tensor] = lambda a, b: flat[a:b]  # noqa: E731
    elif count is None:
        raise ValueError("pack_groups: count is needed when levels is a function")
    else:
        source = levels
    count = _check_count(count)
    groups = _groups(widths.cpu(), count, group_size)
    g, n_full, rem, tail_width = groups.g, groups.n_full, groups.rem, groups.tail_width

    def get(a: int, b: int) -> torch.Tensor:
        return _integers(source(a, b)).cpu()

    present = [w for w, size in enumerate(groups.sizes()) if size]
    out = torch.empty(groups.nbytes(), dtype=torch.uint8)
    if len(present) <= 1:  # one width: one stream, in slices of whole groups
        for a in range(0, count, _span(group_size, count)):
            b = min(a + _span(group_size, count), count)
            part = get(a, b)
            if check:
                _check_values(part, present[0])
            _pack_slice(part, present[0], out[a // 8 * present[0]:(b * present[0] + 7) // 8])
        return out
    if groups.blocks():
        words = torch.empty(n_full, g // 4, dtype=torch.long)
        step = max(1, _SLICE_VALUES // g)
        for a in range(0, n_full, step):
            b = min(a + step, n_full)
            rows = get(a * g, b * g).view(b - a, g)
            if check:
                _check_group_range(rows, groups.widths[a:b], a)
            _encode_blocks(rows.to(torch.int32), _Consts.per_row(groups.widths[a:b]), out=words[a:b])
        blocks = _take_rows(words, groups.order).view(torch.uint8).view(n_full, g // 8, 16)
    else:
        blocks = get(0, n_full * g).view(n_full, g)
        if check:
            _check_group_range(blocks, groups.widths, 0)
        blocks = blocks.index_select(0, groups.order)
    tail = get(n_full * g, count) if rem else None
    start = offset = 0
    for width in present:
        size = (groups.sizes()[width] * width + 7) // 8
        chunk, run = out[offset:offset + size], blocks[start:start + groups.counts[width]]
        if groups.blocks():  # each block's first `width` bytes, then the remainder's bytes
            whole = run.shape[0] * g // 8 * width
            chunk[:whole].view(run.shape[0], g // 8, width).copy_(run[:, :, :width])
            if width == tail_width:
                chunk[whole:] = pack_uint(tail, width)
        else:
            values = run.reshape(-1)
            chunk.copy_(pack_uint(torch.cat([values, tail]) if width == tail_width else values, width))
        start, offset = start + groups.counts[width], offset + size
    return out


def unpack_groups(packed: torch.Tensor, widths: torch.Tensor, count: int, group_size: int,
                  dtype: torch.dtype = torch.int32, apply: tp.Optional[Sink] = None) -> torch.Tensor:
    """Inverse of :func:`pack_groups`.

    Args:
        packed: the ``uint8`` tensor returned by :func:`pack_groups`.
        widths: the widths per group used to pack.
        count: how many values were packed.
        group_size: values per group (0: one group).
        dtype: dtype of the result.
        apply: optional ``apply(levels, start, out)``: writes into ``out`` (a slice of the result)
            what it holds for the values ``[start, start + len(levels))`` (whole groups, slices of
            a few MiB, computed while they are in cache: e.g. DiffQ's dequantized weights).
    Returns:
        a 1-D CPU tensor of ``count`` entries in their original order: the levels, or what
        ``apply`` made of them.
    Raises:
        ValueError: bad arguments, or ``packed`` not of the exact length the widths need.
    """
    count = _check_count(count)
    groups = _groups(widths.cpu(), count, group_size)
    _check_packed(packed, groups.nbytes(), f"{count} values of these group widths")
    packed = packed.cpu()
    g, n_full, rem, tail_width = groups.g, groups.n_full, groups.rem, groups.tail_width
    sink: Sink = apply or (lambda values, start, dest: dest.copy_(values))
    present = [w for w, size in enumerate(groups.sizes()) if size]
    out = torch.empty(count, dtype=dtype)
    if len(present) <= 1:  # one width: one stream, in slices of whole groups
        for a, levels in _unpack_slices(packed, present[0] if present else 8, count,
                                        _span(group_size, count)):
            sink(levels, a, out[a:a + levels.numel()])
        return out
    step = max(1, _SLICE_VALUES // g)
    offset, start = 0, 0
    tail = None
    if groups.blocks():
        blocks = torch.zeros(n_full, g // 8, 16, dtype=torch.uint8)
        for width in present:
            if groups.counts[width]:
                cnt = groups.counts[width]
                size = cnt * g // 8 * width
                blocks[start:start + cnt, :, :width] = packed[offset:offset + size].view(cnt, g // 8, width)
                offset, start = offset + size, start + cnt
            if width == tail_width:
                size = (rem * width + 7) // 8
                tail = unpack_uint(packed[offset:offset + size], width, rem, torch.int32)
                offset += size
        inverse = torch.empty_like(groups.order).scatter_(0, groups.order, torch.arange(n_full))
        words = blocks.view(n_full, g * 2).view(torch.long)
        values = torch.empty(min(step, n_full), g, dtype=torch.int32)
        for a in range(0, n_full, step):
            b = min(a + step, n_full)
            _decode_blocks(_take_rows(words, inverse[a:b]), _Consts.per_row(groups.widths[a:b]),
                           values[:b - a])
            sink(values[:b - a].view(-1), a * g, out[a * g:b * g])
    else:
        rows = torch.empty(n_full, g, dtype=torch.int32)
        for width in present:
            size = groups.sizes()[width]
            nbytes = (size * width + 7) // 8
            chunk = unpack_uint(packed[offset:offset + nbytes], width, size, torch.int32)
            cnt = groups.counts[width]
            rows[start:start + cnt] = chunk[:cnt * g].view(cnt, g)
            offset, start = offset + nbytes, start + cnt
            if width == tail_width:
                tail = chunk[cnt * g:]
        rows = rows.index_select(0, torch.argsort(groups.order))
        for a in range(0, n_full, step):
            sink(rows[a:a + step].reshape(-1), a * g, out[a * g:min(a + step, n_full) * g])
    if tail is not None:
        sink(tail, n_full * g, out[n_full * g:])
    return out


# ----------------------------------------------------------------------------- mixed radix
def radix_plan(levels: int) -> tp.Tuple[int, int]:
    """Best ``(k, word_bits)`` to store values in ``[0, levels)``: ``k`` values per word.

    Minimizes ``word_bits / k`` with ``word_bits = ceil(k * log2(levels)) <= 62``; ties go to the
    smaller ``k`` (less tail padding).
    """
    if isinstance(levels, bool) or int(levels) != levels or levels < 2:
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
    levels = int(levels)
    best = (1, max(1, math.ceil(math.log2(levels))))
    k = 1
    while True:
        k += 1
        bits = (levels ** k - 1).bit_length()  # exact ceil(k*log2 L) without float error
        if bits > _MAX_WORD_BITS:
            return best
        if bits * best[0] < best[1] * k:
            best = (k, bits)


def _split_word(word_bits: int) -> tp.List[int]:
    return [min(MAX_BITS, word_bits - s) for s in range(0, word_bits, MAX_BITS)]


def pack_mixed_radix(values: torch.Tensor, levels: int) -> torch.Tensor:
    """Pack integers in ``[0, levels)`` at ``log2(levels)`` bits each (up to rounding per word).

    Args:
        values: integer tensor, entries in ``[0, levels)``.
        levels: number of distinct values (>= 2; need not be a power of two).
    Returns:
        a 1-D ``uint8`` tensor of ``ceil(ceil(n/k) * word_bits / 8)`` bytes, see :func:`radix_plan`.
    """
    k, word_bits = radix_plan(levels)
    flat = values.reshape(-1).long()
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= levels):
        raise ValueError(f"values to pack must be in [0, {levels - 1}], got range "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    m = (n + k - 1) // k
    padded = torch.zeros(m * k, dtype=torch.long, device=flat.device)
    padded[:n] = flat
    digits = padded.view(m, k)
    word = torch.zeros(m, dtype=torch.long, device=flat.device)
    for j in range(k - 1, -1, -1):  # Horner: word = sum_j digit_j * L**j
        word.mul_(levels).add_(digits[:, j])
    return _pack_words(word, word_bits)


def _pack_words(word: torch.Tensor, word_bits: int) -> torch.Tensor:
    # A word of up to 62 bits is the concatenation of 16-bit pieces: pack each piece stream and
    # concatenate, which costs the same bits as one stream of word_bits-bit values.
    m = word.numel()
    chunks, shift = [], 0
    for width in _split_word(word_bits):
        piece = (word >> shift) & ((1 << width) - 1)
        chunks.append(pack_uint(piece, width) if m else torch.zeros(0, dtype=torch.uint8))
        shift += width
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)


def unpack_mixed_radix(packed: torch.Tensor, levels: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_mixed_radix`; returns ``count`` int64 values."""
    k, word_bits = radix_plan(levels)
    m = (count + k - 1) // k
    sizes = [(m * w + 7) // 8 for w in _split_word(word_bits)]
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != sum(sizes):
        raise ValueError(f"mixed-radix data must be a 1-D uint8 tensor of {sum(sizes)} bytes for "
                         f"{count} values in [0, {levels}), got {packed.numel()} "
                         f"({packed.dtype}): truncated or corrupt state")
    word = torch.zeros(m, dtype=torch.long, device=packed.device)
    offset, shift = 0, 0
    for width, size in zip(_split_word(word_bits), sizes):
        word |= unpack_uint(packed[offset:offset + size], width, m) << shift
        offset += size
        shift += width
    digits = torch.empty(m, k, dtype=torch.long, device=packed.device)
    for j in range(k):
        digits[:, j] = word % levels
        word = word // levels
    return digits.reshape(-1)[:count]
