"""fake_quantize: forward against ONNX Runtime, gradients against hand-written references."""
import math

import pytest
import torch

from lowbit import PerChannel, PerGroup, PerToken, QuantSpec, ops
from lowbit.ops import kernels

from . import ort_ref


def _saturated(x, spec, scale, zp):
    """Independent reference: where round(x/s) + z leaves [qmin, qmax] (float64 except x/s)."""
    s = ops.params.broadcast_param(scale, x.shape, spec).float()
    z = ops.params.broadcast_param(zp, x.shape, spec).double()
    v = torch.round(x.float() / s).double() + z
    return (v < spec.qmin) | (v > spec.qmax)


def _reference_lsq(x, spec, scale, zp, clipped):
    """Fake quantization written with plain autograd: STE round via detach, clamp's own gradient."""
    s = ops.params.broadcast_param(scale, x.shape, spec)
    z = ops.params.broadcast_param(zp, x.shape, spec).to(s.dtype)
    v = x / s
    r = v + (torch.round(v) - v).detach()
    q = torch.clamp(r + z, spec.qmin, spec.qmax)
    y = (q - z) * s
    if not clipped:  # the identity STE passes dL/dx through where the clamp cut it
        cut = ((r + z) != q).detach()
        y = y + (x - x.detach()) * cut
    return y


CASES = [
    (QuantSpec(bits=8), (64,)),
    (QuantSpec(bits=4, symmetric=False, signed=False, granularity=PerChannel(1)), (5, 6)),
    (QuantSpec(bits=4, granularity=PerGroup(4, -1)), (3, 10)),   # partial last group
    (QuantSpec(bits=3, symmetric=False, granularity=PerToken()), (2, 3, 7)),
]


def _inputs(spec, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2
    scale, zp = ops.choose_qparams(x, spec)
    return x * 1.5, scale * (0.5 + torch.rand(scale.shape, generator=gen)), zp  # some x saturate


@pytest.mark.parametrize("spec,shape", CASES, ids=lambda c: str(c))
def test_forward_is_onnx_q_then_dq(spec, shape):
    x, scale, zp = _inputs(spec, shape)
    if spec.bits in (8, 4, 16):
        _, y = ort_ref.qdq(x, spec, scale, zp)
        assert torch.equal(ops.fake_quantize(x, spec, scale, zp), y)
    assert torch.equal(ops.fake_quantize(x, spec, scale, zp, ste="clipped"),
                       ops.dequantize(ops.quantize(x, spec, scale, zp), spec, scale, zp))


@pytest.mark.parametrize("spec,shape", CASES, ids=lambda c: str(c))
def test_identity_ste_passes_the_gradient_everywhere(spec, shape):
    x, scale, zp = _inputs(spec, shape)
    assert bool(_saturated(x, spec, scale, zp).any())
    x.requires_grad_(True)
    g = torch.randn(shape)
    ops.fake_quantize(x, spec, scale, zp).backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("spec,shape", CASES, ids=lambda c: str(c))
def test_clipped_ste_zeroes_the_gradient_where_x_saturated(spec, shape):
    x, scale, zp = _inputs(spec, shape)
    sat = _saturated(x, spec, scale, zp)
    assert bool(sat.any()) and not bool(sat.all())
    x.requires_grad_(True)
    g = torch.randn(shape)
    ops.fake_quantize(x, spec, scale, zp, ste="clipped").backward(g)
    assert torch.equal(x.grad, torch.where(sat, torch.zeros(()), g))


@pytest.mark.parametrize("ste", ["identity", "clipped"])
@pytest.mark.parametrize("spec,shape", CASES, ids=lambda c: str(c))
def test_lsq_scale_gradient_matches_plain_autograd(spec, shape, ste):
    x, scale, zp = _inputs(spec, shape, seed=1)
    x, scale = x.double().requires_grad_(True), scale.double().requires_grad_(True)
    g = torch.randn(shape, dtype=torch.float64)
    y = ops.fake_quantize(x, spec, scale, zp, ste=ste)
    gx, gs = torch.autograd.grad(y, (x, scale), g)
    x2, s2 = x.detach().clone().requires_grad_(True), scale.detach().clone().requires_grad_(True)
    y_ref = _reference_lsq(x2, spec, s2, zp, clipped=ste == "clipped")
    gx_ref, gs_ref = torch.autograd.grad(y_ref, (x2, s2), g)
    assert torch.equal(y, y_ref)
    assert torch.allclose(gx, gx_ref, rtol=1e-12, atol=0)  # the reference computes g * s / s
    assert torch.allclose(gs, gs_ref, rtol=1e-12, atol=1e-12)


def test_lsq_scale_gradient_formula_per_tensor():
    spec = QuantSpec(bits=4, signed=False, symmetric=False)
    x = torch.tensor([0.12, 0.5, -3.0, 0.26, 9.0, math.inf], dtype=torch.float64)
    scale = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    zp = torch.tensor(3)
    y = ops.fake_quantize(x, spec, scale, zp)
    (gs,) = torch.autograd.grad(y.sum(), scale)
    # inside: round(x/s) - x/s; saturated: qmin - z (for -3.0) or qmax - z (for 9.0 and inf)
    v = [1.2, 5.0, None, 2.6, None, None]
    expected = sum(round(a) - a for a in v if a is not None) + (0 - 3) + 2 * (15 - 3)
    assert float(gs) == pytest.approx(expected, abs=1e-9)


def test_gradcheck_where_the_function_is_differentiable():
    spec = QuantSpec(bits=4, granularity=PerChannel(0))
    # every x saturated: y = (q - z) * s is linear in s and constant in x (the clipped STE's 0)
    x = torch.tensor([[5.0, -7.0, 20.0], [-30.0, 11.0, 9.0]], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.25, 0.5], dtype=torch.float64, requires_grad=True)
    zp = torch.zeros(2, dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda a, s: ops.fake_quantize(a, spec, s, zp, ste="clipped"), (x, scale))
    q = torch.tensor([[1, -8, 7], [0, 3, -2]], dtype=torch.int8)
    assert torch.autograd.gradcheck(lambda s: ops.dequantize(q, spec, s, zp), (scale,))


def test_stochastic_fake_quantize_gradients():
    spec = QuantSpec(bits=4, rounding="stochastic", granularity=PerGroup(3, 0))
    x = (torch.randn(7, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_(True)
    scale = torch.full((3,), 0.3, requires_grad=True)
    zp = torch.zeros(3, dtype=torch.int32)
    y = ops.fake_quantize(x, spec, scale, zp, ste="clipped", generator=torch.Generator().manual_seed(1))
    y.sum().backward()
    v = x.detach() / 0.3
    r = ops.stochastic_round(v, generator=torch.Generator().manual_seed(1))  # the same draws
    inside = (r >= spec.qmin) & (r <= spec.qmax)
    assert not bool(inside.all())
    assert torch.equal(x.grad, inside.float())
    expected = torch.where(inside, r - v, r.clamp(spec.qmin, spec.qmax)).double()
    per_group = torch.stack([expected[0:3].sum(), expected[3:6].sum(), expected[6:].sum()])
    assert torch.allclose(scale.grad.double(), per_group, atol=1e-5)


def test_nan_propagates_and_infinities_saturate():
    spec = QuantSpec(bits=8)
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.3], requires_grad=True)
    for scale in (torch.tensor(0.1), torch.tensor(0.1, requires_grad=True)):
        y = ops.fake_quantize(x, spec, scale, 0)
        assert math.isnan(y.detach()[0])
        assert y.detach()[1:].tolist() == pytest.approx([127 * 0.1, -128 * 0.1, 0.3], abs=1e-6)
    y = ops.fake_quantize(x, spec, 0.1, 0, ste="clipped")
    y.backward(torch.ones(4))
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_bad_ste_and_no_grad_paths():
    with pytest.raises(ValueError, match="ste"):
        ops.fake_quantize(torch.ones(2), QuantSpec(), 1.0, 0, ste="soft")
    scale = torch.tensor(0.1, requires_grad=True)
    with torch.no_grad():
        y = ops.fake_quantize(torch.randn(5), QuantSpec(), scale, 0)
    assert not y.requires_grad


# ----------------------------------------------------------------------------- compiled == eager
def test_compiled_kernels_are_bit_identical_to_eager(monkeypatch):
    """Forces the torch.compile path on small tensors and compares it with the eager one."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3000, generator=gen) * 4
    x[::97] = (x[::97] / 0.05).round() * 0.05 + 0.025        # ties of x/s
    x[5], x[6] = math.inf, -math.inf
    grouped = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(64, -1))
    xg = x.reshape(30, 100)                                   # 2 groups per row, the second partial
    sg, zg = ops.choose_qparams(xg, grouped)
    monkeypatch.setenv("LOWBIT_COMPILE_MIN_NUMEL", "0")
    runs = {}
    for mode in ("eager", "compiled"):
        monkeypatch.setenv("LOWBIT_COMPILE", "1" if mode == "compiled" else "0")
        xr = x.clone().requires_grad_(True)
        y = ops.fake_quantize(xr, QuantSpec(bits=8), 0.05, 3, ste="clipped")
        y.backward(torch.ones_like(y))
        q = ops.quantize(x, QuantSpec(bits=8), 0.05, 3)
        runs[mode] = [q, ops.quantize(xg, grouped, sg, zg), y.detach(), xr.grad,
                      ops.dequantize(q, QuantSpec(bits=8), 0.05, 3)]
        if mode == "compiled":
            assert kernels.use_compiled("quantize", x) and not kernels._FAILED, kernels._FAILED
            x_nan = x.clone()
            x_nan[2500] = math.nan
            with pytest.raises(ValueError, match="NaN"):
                ops.quantize(x_nan, QuantSpec(bits=8), 0.05, 3)
    for a, b in zip(runs["eager"], runs["compiled"]):
        assert a.dtype == b.dtype and torch.equal(a, b)
