"""QTensor: exact packed round trips, honest nbytes, dequantize == ops.dequantize."""
import math

import pytest
import torch

from lowbit import PerChannel, PerGroup, PerTensor, PerToken, QTensor, QuantSpec, ops


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("signed,symmetric", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("granularity,shape", [
    (PerTensor(), (7,)), (PerChannel(0), (3, 5)), (PerGroup(4, -1), (3, 9)), (PerToken(), (2, 3, 5)),
], ids=str)
def test_round_trip_is_exact(bits, signed, symmetric, granularity, shape):
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, granularity=granularity)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(bits))
    scale, zp = ops.choose_qparams(x, spec)
    q = ops.quantize(x, spec, scale, zp)
    qt = QTensor.from_float(x, spec)
    assert qt.shape == x.shape and qt.packed == (bits <= 4)
    assert qt.int_repr().dtype == spec.storage_dtype
    assert torch.equal(qt.int_repr(), q)
    assert torch.equal(qt.zero_point, zp) and torch.equal(qt.scale, scale)
    assert torch.equal(qt.dequantize(), ops.dequantize(q, spec, scale, zp))
    assert torch.equal(QTensor.from_int(q, spec, scale, zp).int_repr(), q)


@pytest.mark.parametrize("bits,per_byte", [(2, 4), (3, 2), (4, 2), (8, 1)])
@pytest.mark.parametrize("n", [1, 7, 1000, 1001])
def test_nbytes_is_the_real_storage(bits, per_byte, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    sym = QTensor.from_float(x, QuantSpec(bits=bits))
    assert sym.nbytes == math.ceil(n / per_byte) + 4          # codes + one float32 scale; no zero point
    asym = QTensor.from_float(x, QuantSpec(bits=bits, symmetric=False))
    assert asym.nbytes == math.ceil(n / per_byte) + 4 + 1      # + a one-byte zero point
    unpacked = QTensor.from_float(x, QuantSpec(bits=bits), pack=False)
    assert unpacked.nbytes == n + 4 and not unpacked.packed


def test_sixteen_bit_codes_take_two_bytes():
    x = torch.randn(100)
    for signed in (True, False):
        qt = QTensor.from_float(x, QuantSpec(bits=16, signed=signed, symmetric=False))
        assert qt.nbytes == 200 + 4 + 2
        assert torch.equal(qt.dequantize(), ops.fake_quantize(x, qt.spec, qt.scale, qt.zero_point))


def test_per_group_4bit_weight_costs_at_most_4_25_bits():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=4, granularity=PerGroup(128, -1))
    qt = QTensor.from_float(w, spec, observer="maxabs")
    assert qt.nbytes == 64 * 1024 // 2 + 64 * 8 * 4
    assert qt.bits_per_element == pytest.approx(4.25)
    half = QTensor.from_float(w, spec, observer="maxabs", scale_dtype=torch.float16)
    assert half.bits_per_element == pytest.approx(4.125) and half.scale.dtype == torch.float16
    asym = QTensor.from_float(w, spec.replace(symmetric=False), scale_dtype=torch.float16)
    assert asym.bits_per_element == pytest.approx(4 + 16 / 128 + 8 / 128)


def test_float16_scales_are_what_the_codes_were_computed_with():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits=8, granularity=PerChannel(0))
    qt = QTensor.from_float(x, spec, observer="maxabs", scale_dtype=torch.float16)
    s16 = qt.scale.float()
    exact, _ = ops.choose_qparams(x, spec, "maxabs")
    assert bool((s16 >= exact).all()) and bool((s16 <= exact * (1 + 2 ** -10)).all())   # rounded up
    assert torch.equal(qt.int_repr(), ops.quantize(x, spec, s16, qt.zero_point))
    assert ops.quant_error(x, spec, s16, qt.zero_point).clip_fraction == 0.0              # still fits
    assert qt.dequantize().dtype == torch.float32
    with pytest.raises(ValueError, match="scale_dtype"):
        QTensor.from_float(torch.tensor([1e-30, 2e-30]), QuantSpec(), scale_dtype=torch.float16)
    tiny = QTensor.from_float(torch.tensor([1e-30, 2e-30]), QuantSpec(), scale_dtype=torch.bfloat16)
    assert tiny.scale.dtype == torch.bfloat16 and float(tiny.scale) >= 2e-30 / 127


def test_from_int_validates():
    spec = QuantSpec(bits=4)
    with pytest.raises(ValueError, match="outside"):
        QTensor.from_int(torch.tensor([0, 8]), spec, 1.0, 0)
    with pytest.raises(TypeError, match="q"):
        QTensor.from_int(torch.tensor([0.0, 1.0]), spec, 1.0, 0)
    with pytest.raises(ValueError, match="scale"):
        QTensor.from_int(torch.tensor([0, 1]), spec, -1.0, 0)
    with pytest.raises(ValueError, match="zero_point"):
        QTensor.from_int(torch.tensor([0, 1]), spec, 1.0, 9)
    with pytest.raises(ValueError, match="both"):
        QTensor.from_float(torch.randn(3), spec, scale=torch.tensor(1.0))


def test_nonsymmetric_zero_point_of_a_symmetric_spec_is_kept():
    spec = QuantSpec(bits=8)                         # symmetric, but the caller's zero point is 5
    q = ops.quantize(torch.randn(10), spec, 0.1, 5)
    qt = QTensor.from_int(q, spec, 0.1, 5)
    assert int(qt.zero_point) == 5 and qt.nbytes == 10 + 4 + 1
    assert torch.equal(qt.dequantize(), ops.dequantize(q, spec, 0.1, 5))


def test_input_untouched_and_to_device():
    x = torch.randn(5, 6)
    before = x.clone()
    qt = QTensor.from_float(x, QuantSpec(bits=4, symmetric=False, granularity=PerChannel(0)))
    assert torch.equal(x, before)
    moved = qt.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(moved.dequantize(), qt.dequantize())
    assert "QTensor(shape=(5, 6)" in repr(qt)
