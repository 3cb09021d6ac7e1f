"""Bit packing: exact sizes and round trips at every width, per-group widths, mixed radix."""
import math

import pytest
import torch

from diffq_bench.quant import pack
from diffq_bench.quant.pack import (
    pack_groups,
    pack_mixed_radix,
    pack_uint,
    radix_plan,
    unpack_groups,
    unpack_mixed_radix,
    unpack_uint,
)


@pytest.mark.parametrize("nbits", range(1, 17))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_roundtrip_exact_size(nbits, n):
    gen = torch.Generator().manual_seed(nbits * 1000 + n)
    values = torch.randint(0, 2 ** nbits, (n,), generator=gen)
    packed = pack_uint(values, nbits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * nbits / 8)
    assert torch.equal(unpack_uint(packed, nbits, n), values)


def test_pack_extremes_and_layout():
    # All-ones at 15 bits (the width the official code drops) and the little-endian layout.
    ones = torch.full((13,), 2 ** 15 - 1)
    assert torch.equal(unpack_uint(pack_uint(ones, 15), 15, 13), ones)
    assert pack_uint(torch.tensor([1, 0, 1, 1]), 2).tolist() == [1 | (1 << 4) | (1 << 6)]
    assert pack_uint(torch.tensor([0x1FF]), 9).tolist() == [0xFF, 0x01]
    # shape is flattened in C order
    grid = torch.arange(12).view(3, 4)
    assert torch.equal(unpack_uint(pack_uint(grid, 4), 4, 12), torch.arange(12))


def test_pack_bad_input():
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        pack_uint(torch.tensor([1]), 17)
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        pack_uint(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_uint(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_uint(torch.tensor([-1]), 3)
    with pytest.raises(ValueError, match="integer"):
        pack_uint(torch.tensor([1.0]), 3)
    with pytest.raises(ValueError, match="truncated"):
        unpack_uint(pack_uint(torch.tensor([1, 2, 3]), 5)[:-1], 5, 3)


@pytest.mark.parametrize("levels", [2, 3, 5, 6, 11, 181, 1000, 65536])
def test_mixed_radix_roundtrip_and_density(levels):
    gen = torch.Generator().manual_seed(levels)
    values = torch.randint(0, levels, (4099,), generator=gen)
    packed = pack_mixed_radix(values, levels)
    assert torch.equal(unpack_mixed_radix(packed, levels, values.numel()), values)
    k, word_bits = radix_plan(levels)
    assert word_bits == math.ceil(k * math.log2(levels) - 1e-12)
    # within 1% of the information content (plus the tail word padding)
    assert packed.numel() * 8 <= 1.01 * values.numel() * math.log2(levels) + word_bits + 64


def test_mixed_radix_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        pack_mixed_radix(torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="levels"):
        radix_plan(1)




# ----------------------------------------------------------------------------- per-group widths
def _reference_groups(levels, widths, group_size):
    """The documented layout, built the slow way: per width, ascending, pack_uint of its groups'
    levels in order, the shorter remainder group last."""
    n = levels.numel()
    g = group_size or max(n, 1)
    n_full = n // g
    chunks = []
    for width in range(1, 17):
        parts = [levels[j * g:(j + 1) * g] for j in range(n_full) if int(widths[j]) == width]
        if n % g and int(widths[-1]) == width:
            parts.append(levels[n_full * g:])
        if parts:
            chunks.append(pack_uint(torch.cat(parts), width))
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)


def _grouped_case(n, group_size, low, high, seed):
    gen = torch.Generator().manual_seed(seed)
    g = group_size or max(n, 1)
    groups = -(-n // g) if n else 0
    widths = torch.randint(low, high + 1, (groups,), generator=gen)
    top = (1 << widths.repeat_interleave(g)[:n]) - 1
    levels = torch.minimum((torch.rand(n, generator=gen) * (top + 1)).long(), top)
    levels[::7] = top[::7]  # every width's extreme value
    return levels.int(), widths


@pytest.mark.parametrize("group_size", [0, 1, 3, 8, 16, 24])
@pytest.mark.parametrize("n", [0, 16, 100, 760, 4096])
@pytest.mark.parametrize("low,high", [(1, 16), (2, 14), (8, 8)])
def test_pack_groups_is_the_documented_layout(group_size, n, low, high):
    # the per-group block coding gives exactly the bytes of the per-width streams, at every width
    # (15 and 16 included), with a remainder group, and one or several widths
    levels, widths = _grouped_case(n, group_size, low, high, seed=n + group_size + low)
    packed = pack_groups(levels, widths, group_size)
    assert torch.equal(packed, _reference_groups(levels, widths, group_size))
    assert torch.equal(unpack_groups(packed, widths, n, group_size), levels)


def test_pack_groups_in_slices_from_a_function(monkeypatch):
    # several slices per tensor: the levels asked for are whole groups, the unpacked ones are
    # handed to `apply` as whole groups too, each exactly once, in order
    monkeypatch.setattr(pack, "_SLICE_VALUES", 64)
    levels, widths = _grouped_case(1000, 16, 1, 16, seed=3)  # 62 groups and a remainder of 8
    asked = []

    def source(start, stop):
        asked.append((start, stop))
        return levels[start:stop]

    packed = pack_groups(source, widths, 16, count=1000)
    assert torch.equal(packed, _reference_groups(levels, widths, 16))
    assert all(a % 16 == 0 and (b % 16 == 0 or b == 1000) for a, b in asked)
    assert sorted(asked) == asked and asked[0][0] == 0
    seen = []

    def apply(values, start, out):
        seen.append((start, values.numel()))
        out.copy_(values.double() / 2)

    out = unpack_groups(packed, widths, 1000, 16, dtype=torch.float64, apply=apply)
    assert torch.equal(out, levels.double() / 2)
    assert sum(size for _, size in seen) == 1000 and all(start % 16 == 0 for start, _ in seen)


def test_pack_groups_rejects_a_level_too_wide_for_its_group():
    levels, widths = _grouped_case(64, 16, 2, 2, seed=0)
    widths[1] = 5  # two widths: the block coding path
    levels[20] = 4  # group 1 (entries 16..31) has 5 bits: fine
    levels[40] = 4  # group 2 has 2 bits: out of range
    with pytest.raises(ValueError, match=r"group 2 \(width 2\)"):
        pack_groups(levels, widths, 16)
    levels[40] = -1
    with pytest.raises(ValueError, match=r"group 2 \(width 2\)"):
        pack_groups(levels, widths, 16)


def test_unpack_groups_bad_input_is_one_clear_error():
    levels, widths = _grouped_case(100, 16, 2, 9, seed=1)
    packed = pack_groups(levels, widths, 16)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        unpack_groups(packed[:-1], widths, 100, 16)
    with pytest.raises(ValueError, match="need 7 widths"):
        unpack_groups(packed, widths[:-1], 100, 16)
    with pytest.raises(ValueError, match=r"widths must be in \[1, 16\]"):
        unpack_groups(packed, widths + 9, 100, 16)


@pytest.mark.parametrize("nbits", [1, 3, 8, 13, 16])
def test_big_endian_fallback_gives_the_same_bytes(monkeypatch, nbits):
    values = torch.randint(0, 2 ** nbits, (1001,), generator=torch.Generator().manual_seed(nbits))
    expected = pack_uint(values, nbits)
    monkeypatch.setattr(pack, "_LITTLE", False)
    assert torch.equal(pack_uint(values, nbits), expected)
    assert torch.equal(unpack_uint(expected, nbits, 1001), values)
    levels, widths = _grouped_case(1000, 16, 1, nbits, seed=nbits)
    packed = pack_groups(levels, widths, 16)
    monkeypatch.setattr(pack, "_LITTLE", True)
    assert torch.equal(packed, pack_groups(levels, widths, 16))
