"""Exact bit packing of unsigned integers.

Layout of :func:`pack_uint`: value ``i`` occupies bits ``[i*nbits, (i+1)*nbits)`` of a
little-endian bit stream (bit ``j`` of the stream is bit ``j % 8`` of byte ``j // 8``). The result
is exactly ``ceil(n * nbits / 8)`` bytes: no per-width padding, any width 1..16.

Why this shape: eight consecutive values always fill exactly ``nbits`` bytes, so the values are
viewed as 8 columns of ``m = ceil(n / 8)`` rows and each of the ``nbits`` output bytes of a row is
an OR of at most three shifted columns. That is a handful of vectorized int32 ops over ``m``
elements per byte, with no Python loop over values or groups and no ``n x nbits`` bit matrix.

:func:`pack_mixed_radix` stores integers in ``[0, L)`` for any ``L`` (fractional bit widths):
``k`` values are merged into one base-``L`` word of ``ceil(k*log2 L)`` bits, ``k`` chosen to
minimize the bits per value (within 1% of ``log2 L`` for the widths used in practice).
"""
from __future__ import annotations

import math
import typing as tp

import torch

MAX_BITS = 16
_MAX_WORD_BITS = 62  # base-L words stay below 2**63 (signed int64 arithmetic)


def _check_nbits(nbits: int) -> int:
    if isinstance(nbits, bool) or int(nbits) != nbits or not 1 <= nbits <= MAX_BITS:
        raise ValueError(f"nbits must be an integer in [1, {MAX_BITS}], got {nbits!r}")
    return int(nbits)


def _byte_plan(nbits: int) -> tp.List[tp.List[tp.Tuple[int, int]]]:
    """For each of the ``nbits`` bytes of a block of 8 values: [(value index, shift)].

    ``shift`` > 0 means ``value >> shift``, < 0 means ``value << -shift``; the caller masks to 8 bits.
    """
    plan = []
    for k in range(nbits):
        lo, hi = 8 * k, 8 * k + 8
        terms = []
        for i in range(8):
            start, end = i * nbits, (i + 1) * nbits
            if start < hi and end > lo:
                terms.append((i, lo - start))
        plan.append(terms)
    return plan


def pack_uint(values: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack non-negative integers of ``nbits`` bits each into a dense byte stream.

    Args:
        values: integer tensor of any shape (flattened in C order), entries in ``[0, 2**nbits)``.
        nbits: bit width, an integer in 1..16.
    Returns:
        a 1-D ``uint8`` CPU-or-same-device tensor of exactly ``ceil(numel * nbits / 8)`` bytes.
    Raises:
        ValueError: bad ``nbits``, a non-integer tensor, or a value out of range.
    """
    nbits = _check_nbits(nbits)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"pack_uint needs an integer tensor, got {values.dtype}")
    flat = values.reshape(-1)
    n = flat.numel()
    nbytes = (n * nbits + 7) // 8
    if n == 0:
        return torch.zeros(0, dtype=torch.uint8, device=values.device)
    low, high = torch.aminmax(flat)
    if int(low) < 0 or int(high) >= 2 ** nbits:
        raise ValueError(f"values to pack must be in [0, {2 ** nbits - 1}] for nbits={nbits}, "
                         f"got range [{int(low)}, {int(high)}]")
    if nbits == 8:
        return flat.to(torch.uint8).clone()
    m = (n + 7) // 8
    cols = torch.zeros(8 * m, dtype=torch.int32, device=values.device)
    cols[:n] = flat
    cols = cols.view(m, 8).t().contiguous()  # cols[i] = value i of every block of 8
    out = torch.empty(nbits, m, dtype=torch.uint8, device=values.device)
    for k, terms in enumerate(_byte_plan(nbits)):
        acc = None
        for i, shift in terms:
            term = cols[i] >> shift if shift >= 0 else cols[i] << -shift
            acc = term if acc is None else acc.bitwise_or_(term)
        out[k] = acc.bitwise_and_(0xFF)  # contiguous narrowing copy
    flat_out = out.t().contiguous().view(-1)  # interleave: one pass over uint8 bytes
    return flat_out if flat_out.numel() == nbytes else flat_out[:nbytes].clone()


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
    if isinstance(count, bool) or int(count) != count or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    count = int(count)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed data must be a 1-D uint8 tensor, got {packed.dtype} "
                         f"with shape {tuple(packed.shape)}")
    nbytes = (count * nbits + 7) // 8
    if packed.numel() != nbytes:
        raise ValueError(f"packed data holds {packed.numel()} bytes, expected {nbytes} for "
                         f"{count} values of {nbits} bits (truncated or corrupt state)")
    if count == 0:
        return torch.zeros(0, dtype=dtype, device=packed.device)
    if nbits == 8:
        return packed.to(dtype)
    m = (count + 7) // 8
    data = torch.zeros(m * nbits, dtype=torch.uint8, device=packed.device)
    data[:nbytes] = packed
    data = data.view(m, nbits).t().contiguous().to(torch.int32)  # data[k]: byte k of each block
    plan = _byte_plan(nbits)
    mask = (1 << nbits) - 1
    vals = torch.zeros(8, m, dtype=torch.int32, device=packed.device)
    for k, terms in enumerate(plan):
        for i, shift in terms:  # byte k holds bits of value i, shifted as recorded at packing
            term = data[k] << shift if shift >= 0 else data[k] >> -shift
            vals[i].bitwise_or_(term)
    vals.bitwise_and_(mask)
    return vals.t().reshape(-1)[:count].to(dtype)


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
