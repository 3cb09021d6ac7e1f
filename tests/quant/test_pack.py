"""Bit packing: exact sizes and round trips at every width, mixed radix."""
import math

import pytest
import torch

from diffq_bench.quant.pack import pack_mixed_radix, pack_uint, radix_plan, unpack_mixed_radix, unpack_uint


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


