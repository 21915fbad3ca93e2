import pytest
import torch

from lowbit import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec


@pytest.mark.parametrize("bits,signed,narrow,lo,hi", [
    (8, True, False, -128, 127), (8, True, True, -127, 127), (8, False, False, 0, 255),
    (4, True, False, -8, 7), (4, False, False, 0, 15), (2, True, False, -2, 1),
    (16, True, False, -32768, 32767), (3, False, True, 1, 7),
])
def test_integer_range(bits, signed, narrow, lo, hi):
    s = QuantSpec(bits=bits, signed=signed, narrow_range=narrow)
    assert (s.qmin, s.qmax) == (lo, hi)
    info = torch.iinfo(s.storage_dtype)
    assert info.min <= lo and hi <= info.max


@pytest.mark.parametrize("bits", [1, 17, 0, -3])
def test_bits_out_of_range_is_named(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("kwargs,err", [
    ({"bits": 8.0}, TypeError), ({"rounding": "up"}, ValueError),
    ({"granularity": "per-channel"}, TypeError), ({"signed": 1}, TypeError),
])
def test_bad_fields(kwargs, err):
    with pytest.raises(err):
        QuantSpec(**kwargs)


def test_param_shapes_follow_onnx():
    shape = (6, 10, 3)
    assert QuantSpec(granularity=PerTensor()).param_shape(shape) == ()
    assert QuantSpec(granularity=PerChannel(1)).param_shape(shape) == (10,)
    assert QuantSpec(granularity=PerGroup(4, 1)).param_shape(shape) == (6, 3, 3)  # ceil(10/4)
    assert QuantSpec(granularity=PerToken()).param_shape(shape) == (6, 10, 1)
    with pytest.raises(ValueError, match="axis"):
        QuantSpec(granularity=PerChannel(3)).param_shape(shape)
    with pytest.raises(ValueError, match="size"):
        PerGroup(0)


def test_spec_is_hashable_and_frozen():
    s = QuantSpec(bits=4)
    assert {s: 1}[QuantSpec(bits=4)] == 1
    with pytest.raises(Exception):
        s.bits = 3
    assert s.replace(bits=3).bits == 3
