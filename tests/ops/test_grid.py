"""quantize / dequantize / stochastic_round against ONNX Runtime, NumPy and statistics."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, ops

from . import ort_ref

TYPES = [(8, True), (8, False), (4, True), (4, False), (16, True), (16, False)]
GRANULARITIES = [PerTensor(), PerChannel(0), PerChannel(1), PerGroup(4, 1), PerGroup(2, 0), PerToken()]


def _random_qparams(x, spec, gen):
    """A scale around the fitted one (so some values saturate) and a random zero point."""
    scale, _ = ops.choose_qparams(x, spec.replace(symmetric=True), "maxabs")
    scale = scale * (0.4 + 0.8 * torch.rand(scale.shape, generator=gen))
    if spec.symmetric:
        zp = torch.full(scale.shape, spec.symmetric_zero_point, dtype=torch.int32)
    else:
        zp = torch.randint(spec.qmin, spec.qmax + 1, scale.shape, generator=gen, dtype=torch.int32)
    return scale, zp


def _awkward_input(shape, gen):
    x = torch.randn(shape, generator=gen) * 3
    flat = x.view(-1)
    flat[::7] = flat[::7].round() + 0.5           # ties of x (ties of x/s come in test_exact_ties)
    flat[1], flat[-2] = math.inf, -math.inf       # saturate
    flat[3] = 1e30
    return x


@pytest.mark.parametrize("bits,signed", TYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_onnx_runtime(bits, signed, granularity, symmetric):
    gen = torch.Generator().manual_seed(bits * 7 + signed)
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, granularity=granularity)
    x = _awkward_input((6, 10, 3), gen)   # 10 = 2 groups of 4 + a partial group of 2
    core = torch.randn(6, 10, 3, generator=gen)
    scale, zp = _random_qparams(core, spec, gen)
    codes, y = ort_ref.qdq(x, spec, scale, zp)
    q = ops.quantize(x, spec, scale, zp)
    assert q.dtype == spec.storage_dtype
    assert torch.equal(q.long(), codes)
    assert torch.equal(ops.dequantize(q, spec, scale, zp), ort_ref.dequantize(q, spec, scale, zp))
    assert torch.equal(ops.fake_quantize(x, spec, scale, zp), y)


@pytest.mark.parametrize("bits,signed", TYPES)
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0)], ids=str)
def test_exact_ties_round_half_to_even(bits, signed, granularity):
    spec = QuantSpec(bits=bits, signed=signed, symmetric=False, granularity=granularity)
    halves = torch.tensor([0.5, 1.5, 2.5, -2.5, -0.5, -1.5, 3.5, 6.5, -7.5])
    scale = torch.tensor(0.25) if isinstance(granularity, PerTensor) else torch.tensor([0.25, 2.0 ** -7, 8.0])
    rows = scale.numel()
    x = halves.repeat(rows, 1) * scale.reshape(-1, 1)             # exactly (k + 1/2) * scale
    if isinstance(granularity, PerTensor):
        x = x.reshape(-1)
    zp = torch.full(scale.shape, 0 if signed else 7, dtype=torch.int32)
    q = ops.quantize(x, spec, scale, zp)
    codes, _ = ort_ref.qdq(x, spec, scale, zp)
    assert torch.equal(q.long(), codes)
    expected = np.clip(np.rint(halves.numpy()) + zp.reshape(-1, 1)[0, 0].item(), spec.qmin, spec.qmax)
    assert np.array_equal(q.reshape(rows, -1)[0].numpy(), expected)  # NumPy rint: half to even
    assert q.reshape(rows, -1)[0, 2].item() - zp.view(-1)[0].item() == 2  # 2.5 -> 2, not 3


@pytest.mark.parametrize("bits,signed", TYPES)
def test_infinities_and_huge_values_saturate(bits, signed):
    spec = QuantSpec(bits=bits, signed=signed)
    x = torch.tensor([math.inf, -math.inf, 3e38, -3e38, 1e-45, -1e-45])
    q = ops.quantize(x, spec, torch.tensor(1e-3), torch.tensor(spec.symmetric_zero_point))
    assert q.tolist()[:4] == [spec.qmax, spec.qmin, spec.qmax, spec.qmin]
    assert q.tolist()[4:] == [spec.symmetric_zero_point] * 2
    codes, _ = ort_ref.qdq(x, spec, torch.tensor(1e-3), torch.tensor(spec.symmetric_zero_point))
    assert torch.equal(q.long(), codes)


def test_narrow_range_and_two_bits():
    x = torch.tensor([-10.0, -1.0, -0.5, 0.0, 0.4, 1.0, 10.0])
    assert ops.quantize(x, QuantSpec(bits=8, narrow_range=True), 0.01, 0).tolist() == [-127, -100, -50, 0, 40, 100, 127]
    assert ops.quantize(x, QuantSpec(bits=2), 0.5, 0).tolist() == [-2, -2, -1, 0, 1, 1, 1]
    assert ops.quantize(x, QuantSpec(bits=3, signed=False, narrow_range=True), 1.0, 4).tolist() == [1, 3, 4, 4, 4, 5, 7]


# ----------------------------------------------------------------------------- properties
specs = st.builds(
    QuantSpec,
    bits=st.integers(2, 16), signed=st.booleans(), symmetric=st.booleans(), narrow_range=st.booleans(),
    granularity=st.sampled_from([PerTensor(), PerChannel(0), PerChannel(1), PerGroup(3, 1), PerToken()]),
)


def _subnormals_work() -> bool:
    """False where something in the process turned on flush-to-zero (torch 2.4's compiled kernels do)."""
    return 5e-324 * 2 > 0


def _case(spec, data, finite_only=False):
    rows, cols = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 9))
    sub = _subnormals_work()
    elems = (st.floats(-1e4, 1e4, width=32, allow_subnormal=sub) if finite_only
             else st.floats(width=32, allow_nan=False, allow_subnormal=sub))
    x = torch.tensor(data.draw(st.lists(elems, min_size=rows * cols, max_size=rows * cols)),
                     dtype=torch.float32).reshape(rows, cols)
    pshape = spec.param_shape(x.shape)
    n = math.prod(pshape)
    scales = data.draw(st.lists(st.floats(1e-3, 1e3), min_size=n, max_size=n))
    scale = torch.tensor(scales, dtype=torch.float32).reshape(pshape)
    zps = data.draw(st.lists(st.integers(spec.qmin, spec.qmax), min_size=n, max_size=n))
    return x, scale, torch.tensor(zps, dtype=torch.int32).reshape(pshape)


@settings(max_examples=150, deadline=None)
@given(specs, st.data())
def test_codes_stay_on_the_grid(spec, data):
    x, scale, zp = _case(spec, data)
    q = ops.quantize(x, spec, scale, zp)
    assert q.dtype == spec.storage_dtype and q.shape == x.shape
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax


@settings(max_examples=150, deadline=None)
@given(specs, st.data())
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(spec, data):
    x, scale, zp = _case(spec, data, finite_only=True)
    s = ops.params.broadcast_param(scale, x.shape, spec).double()
    z = ops.params.broadcast_param(zp, x.shape, spec).double()
    lo, hi = ((spec.qmin - z) * s).expand(x.shape), ((spec.qmax - z) * s).expand(x.shape)
    inside = (x.double() >= lo) & (x.double() <= hi)
    x_hat = ops.dequantize(ops.quantize(x, spec, scale, zp), spec, scale, zp).double()
    err = (x_hat - x.double()).abs()
    # half a step, plus the float32 rounding of x/s and of (q - z) * s
    slack = s / 2 * (1 + 1e-6) + x.double().abs() * 2 ** -23
    assert bool((err <= slack)[inside].all())
    # outside the range the value lands on the nearest end of the grid
    above, below = x.double() > hi, x.double() < lo
    assert torch.equal(x_hat[above], hi.float().double()[above])
    assert torch.equal(x_hat[below], lo.float().double()[below])


@settings(max_examples=150, deadline=None)
@given(specs, st.data())
def test_quantize_dequantize_and_fake_quantize_agree(spec, data):
    x, scale, zp = _case(spec, data)
    q = ops.quantize(x, spec, scale, zp)
    y = ops.fake_quantize(x, spec, scale, zp)
    assert torch.equal(ops.dequantize(q, spec, scale, zp), y)
    assert torch.equal(ops.fake_quantize(y, spec, scale, zp), y)             # idempotent
    assert torch.equal(ops.quantize(y, spec, scale, zp), q)                  # codes survive the round trip


@settings(max_examples=100, deadline=None)
@given(specs, st.data())
def test_quantize_is_monotone(spec, data):
    x, scale, zp = _case(spec, data)
    xs, _ = x.reshape(-1).sort()
    spec = spec.replace(granularity=PerTensor())
    q = ops.quantize(xs, spec, scale.reshape(-1)[0], zp.reshape(-1)[0])
    assert bool((q[1:] >= q[:-1]).all())


# ----------------------------------------------------------------------------- stochastic rounding
def test_stochastic_round_is_floor_or_ceil():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=gen) * 50
    x[:100] = x[:100].round()                                   # integers stay put
    r = ops.stochastic_round(x, generator=gen)
    assert bool(((r == x.floor()) | (r == x.ceil())).all())
    assert torch.equal(r[:100], x[:100])
    assert torch.equal(ops.stochastic_round(torch.tensor([math.inf, -math.inf])), torch.tensor([math.inf, -math.inf]))


@pytest.mark.parametrize("frac", [0.03, 0.25, 0.5, 0.7, 0.999])
def test_stochastic_round_is_unbiased(frac):
    n = 200_000
    x = torch.full((n,), -3.0 + frac, dtype=torch.float64)
    r = ops.stochastic_round(x, generator=torch.Generator().manual_seed(int(frac * 1000)))
    se = math.sqrt(frac * (1 - frac) / n)                        # std error of a Bernoulli mean
    assert abs(float(r.mean()) - float(x[0])) < 4 * se
    assert set(r.unique().tolist()) == {-3.0, -2.0}


def test_stochastic_quantize_is_unbiased_and_reproducible():
    spec = QuantSpec(bits=4, rounding="stochastic", granularity=PerChannel(0))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, generator=gen).expand(4, 50_000).contiguous() * 6 - 3
    scale, zp = torch.tensor([0.5, 0.37, 0.25, 1.0]), torch.zeros(4, dtype=torch.int32)
    q = ops.quantize(x, spec, scale, zp, generator=torch.Generator().manual_seed(5))
    x_hat = ops.dequantize(q, spec, scale, zp)
    v = x[:, 0] / scale
    p = v - v.floor()
    se = scale * torch.sqrt(p * (1 - p) / x.shape[1])
    assert bool(((x_hat.mean(dim=1) - x[:, 0]).abs() < 4 * se + 1e-7).all())
    again = ops.quantize(x, spec, scale, zp, generator=torch.Generator().manual_seed(5))
    assert torch.equal(q, again)
    other = ops.quantize(x, spec, scale, zp, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(q, other)
    y = ops.fake_quantize(x, spec, scale, zp, generator=torch.Generator().manual_seed(5))
    assert torch.equal(y, x_hat)  # the same seed draws the same rounding in fake_quantize


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf, torch.tensor([1.0, 0.0, 1.0])])
def test_bad_scale_is_named(scale):
    spec = QuantSpec(granularity=PerChannel(0)) if isinstance(scale, torch.Tensor) else QuantSpec()
    for fn in (lambda: ops.quantize(torch.ones(3, 2), spec, scale, torch.zeros_like(torch.as_tensor(scale), dtype=torch.int32)),
               lambda: ops.dequantize(torch.ones(3, 2, dtype=torch.int8), spec, scale, torch.zeros_like(torch.as_tensor(scale), dtype=torch.int32)),
               lambda: ops.fake_quantize(torch.ones(3, 2), spec, scale, torch.zeros_like(torch.as_tensor(scale), dtype=torch.int32))):
        with pytest.raises(ValueError, match="scale"):
            fn()


@pytest.mark.parametrize("spec,zp", [
    (QuantSpec(bits=8), 128), (QuantSpec(bits=8), -129), (QuantSpec(bits=4, signed=False), 16),
    (QuantSpec(bits=8, narrow_range=True), -128), (QuantSpec(bits=8), 1.5), (QuantSpec(bits=8), torch.tensor(math.inf)),
    (QuantSpec(bits=8), torch.tensor(2.5)),
])
def test_bad_zero_point_is_named(spec, zp):
    with pytest.raises(ValueError, match="zero_point"):
        ops.quantize(torch.ones(3), spec, 0.1, zp)


@pytest.mark.parametrize("granularity,shape", [
    (PerTensor(), (2,)), (PerChannel(0), (3,)), (PerChannel(1), (4,)), (PerGroup(2, 1), (4, 2)),
    (PerGroup(2, 1), (4, 3, 1)), (PerToken(), (4,)),
])
def test_scale_shape_must_fit_the_granularity(granularity, shape):
    spec = QuantSpec(granularity=granularity)
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="scale has shape"):
        ops.quantize(x, spec, torch.ones(shape), torch.zeros(shape, dtype=torch.int32))


def test_wrong_types_are_named():
    with pytest.raises(TypeError, match="x"):
        ops.quantize(torch.ones(3, dtype=torch.int32), QuantSpec(), 1.0, 0)
    with pytest.raises(TypeError, match="spec"):
        ops.quantize(torch.ones(3), "int8", 1.0, 0)
    with pytest.raises(TypeError, match="scale"):
        ops.quantize(torch.ones(3), QuantSpec(), torch.tensor(1), 0)
    with pytest.raises(TypeError, match="scale"):
        ops.quantize(torch.ones(3), QuantSpec(), "1.0", 0)
    with pytest.raises(TypeError, match="q"):
        ops.dequantize(torch.ones(3), QuantSpec(), 1.0, 0)
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=17)


def test_nan_cannot_be_quantized():
    x = torch.tensor([1.0, math.nan, 2.0])
    for spec in (QuantSpec(), QuantSpec(rounding="stochastic"), QuantSpec(granularity=PerGroup(2, 0))):
        with pytest.raises(ValueError, match="NaN"):
            ops.quantize(x, spec, 0.1 if isinstance(spec.granularity, PerTensor) else torch.full((2,), 0.1),
                         0 if isinstance(spec.granularity, PerTensor) else torch.zeros(2, dtype=torch.int32))


def test_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(3)
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(3, 1))
    x = torch.randn(4, 7, generator=gen)
    scale, zp = ops.choose_qparams(x, spec)
    before = [t.clone() for t in (x, scale, zp)]
    q = ops.quantize(x, spec, scale, zp)
    q_before = q.clone()
    ops.dequantize(q, spec, scale, zp)
    ops.fake_quantize(x, spec, scale, zp, ste="clipped")
    ops.quant_error(x, spec, scale, zp)
    for a, b in zip((x, scale, zp, q), before + [q_before]):
        assert torch.equal(a, b)


def test_float16_and_float64_inputs():
    spec = QuantSpec(bits=8, granularity=PerChannel(0))
    x = torch.randn(3, 8, dtype=torch.float64)
    scale, zp = ops.choose_qparams(x, spec)
    y = ops.fake_quantize(x, spec, scale, zp)
    assert y.dtype == torch.float64
    h = x.half()
    yh = ops.fake_quantize(h, spec, scale, zp)
    assert yh.dtype == torch.float16
    assert torch.equal(yh, ops.fake_quantize(h.float(), spec, scale, zp).half())
    assert torch.equal(ops.quantize(h, spec, scale, zp), ops.quantize(h.float(), spec, scale, zp))


def test_empty_tensor():
    spec = QuantSpec()
    q = ops.quantize(torch.empty(0, 3), spec, 1.0, 0)
    assert q.shape == (0, 3)
    assert ops.dequantize(q, spec, 1.0, 0).shape == (0, 3)
    assert ops.fake_quantize(torch.empty(0), spec, 1.0, 0).shape == (0,)
