"""Bit packing: exact round trips, and the byte layout ONNX Runtime reads for INT4/UINT4/INT2/UINT2."""
import pytest
import torch

from lowbit.ops import packing

from . import ort_ref


def _codes(bits, signed, n, seed=0):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 33, 1001])
def test_round_trip_is_exact(bits, signed, n):
    q = _codes(bits, signed, n, seed=n)
    packed = packing.pack(q.to(torch.int8 if signed else torch.uint8), bits)
    assert packed.dtype == torch.uint8
    per_byte = 4 if bits == 2 else 2
    assert packed.numel() == -(-n // per_byte) == packing.packed_numel(n, bits)
    out = packing.unpack(packed, bits, n, signed, torch.int32)
    assert out.dtype == torch.int32 and torch.equal(out, q.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_layout_is_the_one_onnx_runtime_reads(bits, signed):
    q = _codes(bits, signed, 37, seed=bits)
    decoded = ort_ref.decode_packed(packing.pack(q, bits), bits, signed, 37)
    assert torch.equal(decoded, q.to(torch.int64))


def test_multidimensional_codes_pack_in_row_major_order():
    q = _codes(4, True, 15).reshape(3, 5)
    assert torch.equal(packing.unpack(packing.pack(q, 4), 4, 15, True, torch.int8), q.reshape(-1).to(torch.int8))


def test_wide_codes_are_refused():
    with pytest.raises(ValueError, match="bits"):
        packing.pack(torch.zeros(4, dtype=torch.int8), 8)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_unpack_reads_every_byte_as_onnx_runtime_does(bits, signed):
    packed = torch.arange(256, dtype=torch.uint8).repeat(2)       # every byte value, twice
    n = packed.numel() * (8 // bits) - 1                            # the last field is padding
    expected = ort_ref.decode_packed(packed, bits, signed, n)
    for dtype in (torch.int8, torch.int32, torch.float32):
        out = packing.unpack(packed, bits, n, signed, dtype)
        assert out.dtype == dtype and torch.equal(out.to(torch.int64), expected)
