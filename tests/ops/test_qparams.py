"""choose_qparams / range_to_qparams: the grid is fitted as documented, degenerate ranges stay valid."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, ops

SPECS = [QuantSpec(bits=b, signed=sg, symmetric=sy, narrow_range=n)
         for b in (2, 3, 4, 8, 16) for sg in (True, False) for sy in (True, False) for n in (False, True)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_maxabs_maps_the_largest_magnitude_to_qmax_and_nothing_saturates(spec):
    gen = torch.Generator().manual_seed(spec.bits)
    x = torch.randn(1000, generator=gen) * 3
    scale, zp = ops.choose_qparams(x, spec.replace(symmetric=True), "maxabs")
    r = float(x.abs().max())
    assert float(scale) == pytest.approx(r / (spec.qmax - spec.symmetric_zero_point), rel=1e-6)
    q = ops.quantize(x, spec, scale, zp)
    i = int(x.abs().argmax())
    assert int(q[i]) - int(zp) == int(math.copysign(spec.qmax - spec.symmetric_zero_point, float(x[i])))
    assert ops.quant_error(x, spec, scale, zp).clip_fraction == 0.0


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.symmetric], ids=str)
def test_minmax_spans_the_range_and_keeps_zero_exact(spec):
    gen = torch.Generator().manual_seed(spec.bits + 1)
    for x in (torch.rand(500, generator=gen) * 5 - 1, torch.rand(500, generator=gen) + 2):
        scale, zp = ops.choose_qparams(x, spec, "minmax")
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        assert float(scale) == pytest.approx((hi - lo) / (spec.qmax - spec.qmin), rel=1e-6)
        assert spec.qmin <= int(zp) <= spec.qmax
        zero = ops.fake_quantize(torch.zeros(1), spec, scale, zp)
        assert float(zero) == 0.0                                     # 0 is on the grid
        err = ops.quant_error(x, spec, scale, zp)
        assert err.clip_mse <= float(scale) ** 2                       # at most the ends clip, by < 1 step


@pytest.mark.parametrize("granularity,shape", [
    (PerTensor(), ()), (PerChannel(0), (6,)), (PerChannel(-1), (9,)), (PerGroup(4, 1), (6, 3)),
    (PerGroup(4, 0), (2, 9)), (PerToken(), (6, 1)),
])
@pytest.mark.parametrize("observer", ["minmax", "maxabs"])
def test_per_row_parameters_match_a_loop_over_rows(granularity, shape, observer):
    spec = QuantSpec(bits=4, symmetric=False, granularity=granularity)
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    scale, zp = ops.choose_qparams(x, spec, observer)
    assert tuple(scale.shape) == shape and tuple(zp.shape) == shape
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    # the oracle: per-tensor qparams of each slice that shares a scale
    per_tensor = spec.replace(granularity=PerTensor())
    s_full = ops.params.broadcast_param(scale, x.shape, spec).expand(x.shape)
    z_full = ops.params.broadcast_param(zp, x.shape, spec).expand(x.shape)
    for idx in [(i, j) for i in range(6) for j in range(9)]:
        if isinstance(granularity, PerTensor):
            piece = x
        elif isinstance(granularity, PerChannel):
            piece = x[:, idx[1]] if granularity.axis == -1 else x[idx[0]]
        elif isinstance(granularity, PerToken):
            piece = x[idx[0]]
        elif granularity.axis == 1:
            g = idx[1] // 4
            piece = x[idx[0], 4 * g:4 * g + 4]
        else:
            g = idx[0] // 4
            piece = x[4 * g:4 * g + 4, idx[1]]
        s1, z1 = ops.choose_qparams(piece, per_tensor, observer)
        assert float(s_full[idx]) == float(s1) and int(z_full[idx]) == int(z1)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SPECS), st.floats(width=32, allow_nan=False, allow_infinity=False),
       st.sampled_from(["minmax", "maxabs"]), st.integers(1, 20))
def test_constant_tensors_round_trip_exactly(spec, c, observer, n):
    x = torch.full((n,), c, dtype=torch.float32)
    scale, zp = ops.choose_qparams(x, spec, observer)
    assert bool(torch.isfinite(scale)) and float(scale) > 0
    assert spec.qmin <= int(zp) <= spec.qmax
    assert torch.equal(ops.fake_quantize(x, spec, scale, zp), x)


@pytest.mark.parametrize("spec", SPECS[:8], ids=str)
def test_all_zero_and_all_nonfinite_rows_get_scale_one(spec):
    spec = spec.replace(granularity=PerChannel(0))
    x = torch.tensor([[0.0, 0.0], [math.nan, math.inf], [1.0, -2.0]])
    scale, zp = ops.choose_qparams(x, spec)
    assert scale[:2].tolist() == [1.0, 1.0] and float(scale[2]) > 0
    assert torch.equal(ops.fake_quantize(x[:1], spec.replace(granularity=PerTensor()), scale[0], zp[0]), x[:1])


def test_nonfinite_values_are_ignored_by_the_range():
    spec = QuantSpec(bits=8, symmetric=False)
    x = torch.tensor([1.0, -2.0, math.inf, -math.inf, math.nan, 3.0])
    assert torch.equal(torch.stack(ops.choose_qparams(x, spec)).float(),
                       torch.stack(ops.choose_qparams(x[torch.isfinite(x)], spec)).float())


def test_extreme_ranges_stay_finite():
    for spec in (QuantSpec(bits=8, symmetric=False), QuantSpec(bits=16, symmetric=False, signed=False), QuantSpec(bits=8)):
        x = torch.tensor([-3e38, 3.4e38, 1.0])
        scale, zp = ops.choose_qparams(x, spec)
        assert bool(torch.isfinite(scale)) and float(scale) > 0
        ops.quantize(x, spec, scale, zp)
        tiny = torch.tensor([1e-42, -3e-43, 0.0])                      # subnormal
        scale, zp = ops.choose_qparams(tiny, spec)
        assert bool(torch.isfinite(scale)) and float(scale) > 0


def test_float64_input_gives_float64_scale():
    scale, zp = ops.choose_qparams(torch.randn(10, dtype=torch.float64), QuantSpec())
    assert scale.dtype == torch.float64 and zp.dtype == torch.int32


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="observer"):
        ops.choose_qparams(torch.randn(4), QuantSpec(), "histogram-magic")
    with pytest.raises(TypeError, match="x"):
        ops.choose_qparams(torch.arange(4), QuantSpec())
    with pytest.raises(TypeError, match="spec"):
        ops.choose_qparams(torch.randn(4), {"bits": 8})
    with pytest.raises(ValueError, match="empty"):
        ops.choose_qparams(torch.empty(0), QuantSpec())
    with pytest.raises(ValueError, match="axis"):
        ops.choose_qparams(torch.randn(4), QuantSpec(granularity=PerChannel(1)))


def test_register_range_method():
    calls = []

    def half_range(rows, spec, shrink=0.5):
        calls.append(shrink)
        lo, hi = ops.qparams.finite_minmax(rows)
        return lo * shrink, hi * shrink

    ops.qparams.register_range_method("_test_half", half_range)
    try:
        x = torch.tensor([-4.0, 2.0])
        scale, _ = ops.choose_qparams(x, QuantSpec(bits=8), "_test_half", shrink=0.25)
        assert calls == [0.25] and float(scale) == pytest.approx(1.0 / 127)
    finally:
        ops.RANGE_METHODS.pop("_test_half")
