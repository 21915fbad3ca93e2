"""Training-time quantization math: LSQ/PACT gradients against the papers' formulas, noise statistics."""
import math

import pytest
import torch
from scipy import stats

import lowbit as lb
from lowbit import ops
from lowbit.modules import ActQuantizer, WeightQuantizer
from lowbit.qat import QATActQuantizer, QATWeightQuantizer, grad_scale, lsq_grad_factor, noise_fake_quantize, pact_fake_quantize


def _lsq_dyds(x, s, z, qmin, qmax):
    """Esser et al. 2020, eq. 3: dy/ds = round(v) - v inside, qmin - z / qmax - z outside (float64)."""
    v = x.double() / s.double()
    r = torch.round(v) + z
    return torch.where(r < qmin, torch.full_like(v, qmin - z), torch.where(r > qmax, torch.full_like(v, qmax - z), torch.round(v) - v))


def test_grad_scale_is_exact_forward_and_scales_backward():
    s = torch.rand(7, dtype=torch.float32, generator=torch.Generator().manual_seed(0)) + 0.1
    p = s.clone().requires_grad_(True)
    y = grad_scale(p, 0.3)
    assert torch.equal(y, s)
    c = torch.randn(7, generator=torch.Generator().manual_seed(1))
    (y * c).sum().backward()
    torch.testing.assert_close(p.grad, 0.3 * c)


@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_weight_step_gradient_matches_the_paper_times_g(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 3, 5, generator=gen)                       # a conv weight: 6 channels of 15
    spec = lb.QuantSpec(bits=bits, granularity=lb.PerChannel(0))
    wq = QATWeightQuantizer(WeightQuantizer(spec), w, learn_scale=True).train()
    with torch.no_grad():
        wq.scale.mul_(0.7)                                       # make some weights clip
    c = torch.randn(6, 3, 5, generator=gen)
    (wq(w) * c).sum().backward()
    s = wq.scale.detach()
    dyds = _lsq_dyds(w.reshape(6, -1), s[:, None], 0, spec.qmin, spec.qmax)
    g = 1 / math.sqrt(15 * spec.qmax)                             # N = weights per step, Q_P = qmax
    expected = g * (dyds * c.reshape(6, -1).double()).sum(1)
    torch.testing.assert_close(wq.scale.grad.double(), expected, rtol=1e-5, atol=1e-7)
    assert lsq_grad_factor(15, spec) == pytest.approx(g)


@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_lsq_activation_gradients(ste):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 10, generator=gen) * 2
    spec = lb.QuantSpec(bits=4, signed=False, symmetric=False)
    base = ActQuantizer(spec)
    base.set_qparams(torch.tensor(0.2), torch.tensor(5, dtype=torch.int32))   # range [-1, 2]: clips both ends
    aq = QATActQuantizer(base, learn="lsq", ste=ste).train()
    x = x.requires_grad_(True)
    c = torch.randn(4, 3, 10, generator=gen)
    (aq(x) * c).sum().backward()
    dyds = _lsq_dyds(x.detach(), torch.tensor(0.2), 5, spec.qmin, spec.qmax)
    g = 1 / math.sqrt(30 * 15)                                    # N_F = features per sample
    torch.testing.assert_close(aq.scale.grad.double(), g * (dyds * c.double()).sum(), rtol=1e-5, atol=1e-7)
    v = torch.round(x.detach() / 0.2) + 5
    inside = (v >= spec.qmin) & (v <= spec.qmax)
    assert not inside.all() and inside.any()
    torch.testing.assert_close(x.grad, c if ste == "identity" else c * inside)


def test_pact_step_learns_from_clipped_values_only():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(500, generator=gen).abs() * 3                   # after a ReLU
    spec = lb.QuantSpec(bits=4, signed=False, symmetric=False)
    s = torch.tensor(0.1, requires_grad=True)                       # alpha = 15 * 0.1 = 1.5
    c = torch.randn(500, generator=gen)
    y = pact_fake_quantize(x, spec, s, torch.tensor(0, dtype=torch.int32))
    assert torch.equal(y, ops.fake_quantize(x, spec, 0.1, 0))
    (y * c).sum().backward()
    clipped = x / 0.1 > 15.5
    assert 0 < clipped.sum() < 500
    # PACT: dy/dalpha = 1[x >= alpha], alpha = 15 s  =>  dy/ds = 15 on clipped values, 0 inside
    torch.testing.assert_close(s.grad, 15 * c[clipped].sum(), rtol=1e-5, atol=1e-6)


def test_noise_surrogate_is_uniform_with_variance_s2_over_12():
    gen = torch.Generator().manual_seed(5)
    s = 0.05
    x = (torch.rand(200_000, generator=gen) - 0.5) * 100 * s     # well inside an int8 grid: no clipping
    spec = lb.QuantSpec(bits=8)
    y = noise_fake_quantize(x, spec, s, 0, generator=torch.Generator().manual_seed(6))
    e = ((y.double() - x.double()) / s)
    n = e.numel()
    assert abs(e.mean().item()) < 5 * math.sqrt(1 / 12 / n)        # mean 0
    assert abs(e.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # Var(U(-1/2,1/2)) = 1/12, Var(e^2) = 1/180
    assert stats.kstest(e.numpy(), stats.uniform(loc=-0.5, scale=1).cdf).pvalue > 1e-3
    assert (e - e.round()).abs().max() > 0.4                        # not rounding: off the grid


def test_noise_gradient_in_step_is_the_noise():
    gen = torch.Generator().manual_seed(7)
    inside = torch.rand(1000, generator=gen) * 2 - 1                # |x| < 1: inside the int8 range +-1.27
    outside = torch.cat([torch.full((30,), 2.0), torch.full((20,), -3.0)])
    x = torch.cat([inside, outside])
    s = torch.tensor(0.01, requires_grad=True)
    y = noise_fake_quantize(x, lb.QuantSpec(bits=8), s, 0, generator=torch.Generator().manual_seed(8))
    y.sum().backward()
    u = (y.detach()[:1000].double() - inside.double()) / 0.01        # the noise drawn, in steps
    assert u.abs().max() <= 0.5 + 1e-4
    expected = u.sum() + 30 * 127 + 20 * (-128)                      # dy/ds = u inside, qmax / qmin outside
    torch.testing.assert_close(s.grad.double(), expected, rtol=1e-4, atol=1e-2)


def test_noise_and_stochastic_rounding_are_off_in_eval():
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(8, 16, generator=gen)
    spec = lb.QuantSpec(bits=3, granularity=lb.PerChannel(0))
    for kw in ({"surrogate": "noise"}, {"rounding": "stochastic"}):
        wq = QATWeightQuantizer(WeightQuantizer(spec), w, **kw).eval()
        s, z = wq.qparams(w)
        nearest = ops.fake_quantize(w, spec, s, z)
        assert torch.equal(wq(w), nearest) and torch.equal(wq(w), nearest)
        wq.train()
        assert not torch.equal(wq(w), nearest)


def test_stochastic_rounding_is_unbiased_on_the_grid_and_seeded():
    gen = torch.Generator().manual_seed(10)
    w = torch.randn(4, 32, generator=gen)
    spec = lb.QuantSpec(bits=4, granularity=lb.PerChannel(0))
    a = QATWeightQuantizer(WeightQuantizer(spec), w, rounding="stochastic", seed=3).train()
    b = QATWeightQuantizer(WeightQuantizer(spec), w, rounding="stochastic", seed=3).train()
    c = QATWeightQuantizer(WeightQuantizer(spec), w, rounding="stochastic", seed=4).train()
    s = a.qparams(w)[0][:, None]
    draws = torch.stack([a(w) for _ in range(2000)])
    assert torch.equal(torch.stack([b(w) for _ in range(2000)]), draws)    # same seed, same draws
    assert not torch.equal(c(w), draws[0])
    v = w / s
    assert ((draws / s - v.floor()).round().abs() <= 1).all()            # always floor or ceil
    assert set(torch.unique((draws / s - v.floor()).round()).tolist()) <= {0.0, 1.0}
    inside = (v > spec.qmin) & (v < spec.qmax)
    mean_err = (draws.double().mean(0) - w.double())[inside] / s.expand_as(w)[inside].double()
    # each mean of 2000 Bernoulli draws has sd <= 0.5/sqrt(2000) steps
    assert mean_err.abs().max() < 6 * 0.5 / math.sqrt(2000)
