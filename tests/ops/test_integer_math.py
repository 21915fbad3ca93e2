"""Fixed-point requantization against exact rational arithmetic (Python ints / fractions)."""
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.ops.integer_math import int_matmul, quantize_multiplier, requantize

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def _round_fraction(f: Fraction, mode: str) -> int:
    fl = math.floor(f)
    rest = f - fl
    if rest > Fraction(1, 2):
        return fl + 1
    if rest < Fraction(1, 2):
        return fl
    if mode == "half_even":
        return fl + (fl % 2)
    return fl + 1 if f > 0 else fl          # half away from zero


def _gemmlowp_reference(x: int, mantissa: int, shift: int) -> int:
    """A line-by-line Python port of TFLite's reference MultiplyByQuantizedMultiplier."""
    exponent = 31 - shift
    left, right = max(exponent, 0), max(-exponent, 0)
    x = max(INT32_MIN, min(INT32_MAX, x * (1 << left)))
    ab = x * mantissa
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    num = ab + nudge
    high = abs(num) // (1 << 31) * (1 if num >= 0 else -1)          # C++ division truncates toward 0
    mask = (1 << right) - 1
    remainder = high & mask
    threshold = (mask >> 1) + (1 if high < 0 else 0)
    return (high >> right) + (1 if remainder > threshold else 0)


multipliers = st.floats(min_value=1e-9, max_value=3.9, allow_nan=False, allow_infinity=False)
accumulators = st.integers(min_value=INT32_MIN, max_value=INT32_MAX)


@settings(max_examples=300, deadline=None)
@given(m=multipliers)
def test_quantize_multiplier_is_a_31_bit_mantissa_with_relative_error_below_2_pow_31(m):
    mantissa, shift = quantize_multiplier(m)
    mantissa, shift = int(mantissa), int(shift)
    assert (1 << 30) <= mantissa < (1 << 31)
    approx = Fraction(mantissa, 1 << shift) if shift >= 0 else Fraction(mantissa * (1 << -shift))
    assert abs(approx - Fraction(m)) <= Fraction(m) * Fraction(1, 1 << 31)


@settings(max_examples=300, deadline=None)
@given(m=multipliers, acc=st.lists(accumulators, min_size=1, max_size=8),
       z=st.integers(-128, 127), mode=st.sampled_from(["half_even", "half_away"]))
def test_single_rounding_equals_exact_rational_rounding(m, acc, z, mode):
    mantissa, shift = quantize_multiplier(m)
    got = requantize(torch.tensor(acc, dtype=torch.int32), mantissa, shift, z, INT32_MIN, INT32_MAX, rounding=mode)
    exact = [_round_fraction(Fraction(a * int(mantissa), 1 << int(shift)), mode) + z for a in acc]
    assert got.tolist() == [max(INT32_MIN, min(INT32_MAX, e)) for e in exact]


@settings(max_examples=300, deadline=None)
@given(m=multipliers, acc=st.lists(accumulators, min_size=1, max_size=8))
def test_gemmlowp_mode_matches_the_tflite_reference_and_is_within_one_of_exact(m, acc):
    mantissa, shift = quantize_multiplier(m)
    got = requantize(torch.tensor(acc, dtype=torch.int64), mantissa, shift, 0, INT32_MIN, INT32_MAX, rounding="gemmlowp")
    ref = [_gemmlowp_reference(a, int(mantissa), int(shift)) for a in acc]
    assert got.tolist() == [max(INT32_MIN, min(INT32_MAX, r)) for r in ref]
    if m < 1:   # no saturation of the left shift: double rounding is off by at most one
        exact = [_round_fraction(Fraction(a * int(mantissa), 1 << int(shift)), "half_away") for a in acc]
        assert all(abs(g - e) <= 1 for g, e in zip(got.tolist(), exact))


def test_ties_and_per_channel_broadcast():
    # M = 0.5 exactly: acc = odd numbers are ties
    mantissa, shift = quantize_multiplier(torch.tensor([0.5, 0.25]))
    acc = torch.tensor([[1, 2], [3, 6], [-1, -2], [-3, -6]], dtype=torch.int32)
    even = requantize(acc, mantissa, shift, 0, -128, 127)
    away = requantize(acc, mantissa, shift, 0, -128, 127, rounding="half_away")
    assert even.tolist() == [[0, 0], [2, 2], [0, 0], [-2, -2]]
    assert away.tolist() == [[1, 1], [2, 2], [-1, -1], [-2, -2]]
    # saturation and zero point
    sat = requantize(torch.tensor([1000, -1000, 10]), *quantize_multiplier(1.0), 5, -128, 127)
    assert sat.tolist() == [127, -128, 15]


def test_many_random_multipliers_vectorized():
    g = torch.Generator().manual_seed(0)
    m = torch.exp(torch.empty(2000, dtype=torch.float64).uniform_(-20, 1, generator=g))
    acc = torch.randint(INT32_MIN, INT32_MAX, (2000,), generator=g, dtype=torch.int64)
    mantissa, shift = quantize_multiplier(m)
    got = requantize(acc, mantissa, shift, 0, INT32_MIN, INT32_MAX)
    exact = [_round_fraction(Fraction(int(a) * int(mm), 1 << int(s)), "half_even")
             for a, mm, s in zip(acc.tolist(), mantissa.tolist(), shift.tolist())]
    assert got.tolist() == [max(INT32_MIN, min(INT32_MAX, e)) for e in exact]


def test_bad_input():
    with pytest.raises(ValueError, match="multiplier"):
        quantize_multiplier(0.0)
    with pytest.raises(ValueError, match="multiplier"):
        quantize_multiplier(float("nan"))
    with pytest.raises(TypeError, match="acc"):
        requantize(torch.tensor([1.0]), 1 << 30, 31, 0, -128, 127)
    with pytest.raises(ValueError, match="int32"):
        requantize(torch.tensor([1 << 40]), 1 << 30, 31, 0, -128, 127)
    with pytest.raises(ValueError, match="rounding"):
        requantize(torch.tensor([1]), 1 << 30, 31, 0, -128, 127, rounding="up")


@pytest.mark.parametrize("da,db", [(torch.int8, torch.int8), (torch.int16, torch.int32), (torch.int32, torch.int8)])
def test_int_matmul_is_exact(da, db):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (9, 300), generator=g).to(da)
    b = torch.randint(-128, 128, (300, 7), generator=g).to(db)
    ref = a.to(torch.int64) @ b.to(torch.int64)
    out = int_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.to(torch.int64), ref)
    a3, b3 = a.reshape(3, 3, 300), torch.stack([b, b, b])
    assert torch.equal(int_matmul(a3, b3).to(torch.int64), torch.bmm(a3.to(torch.int64), b3.to(torch.int64)))
    with pytest.raises(TypeError):
        int_matmul(a.float(), b)
