import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.analysis import logit_bound


def _inputs(x):
    """The test digits plus inputs the models never saw: noise, scaled and shifted digits (outside the
    calibrated ranges, so the quantizers clip)."""
    g = torch.Generator().manual_seed(0)
    return torch.cat([x, torch.rand(100, 1, 8, 8, generator=g) * 2, 3 * x[:50], x[:50] - 0.5])


def _check_sound(m, q, x, rounding="worst"):
    r = logit_bound(m, q, x, rounding=rounding)
    assert r.available, r.unsupported
    measured = (q(x).double() - m(x).double()).abs().amax(1)
    torch.testing.assert_close(r.measured, measured)
    assert bool((measured <= r.bound).all()), float((measured / r.bound).max())
    assert bool((r.bound <= r.interval_bound).all())     # the backward pass only ever tightens
    return r


@pytest.mark.parametrize("bits,act_bits,rounding", [(8, 8, "worst"), (8, 8, "exact"), (4, 8, "worst"), (3, 4, "exact"),
                                                    (8, None, "worst"), (16, 16, "worst"), (16, 16, "exact")])
def test_the_bound_is_never_exceeded(rescnn, quantized, bits, act_bits, rounding):
    m, x, _ = rescnn
    q = quantized(m, bits, act_bits)
    r = _check_sound(m, q, _inputs(x), rounding)
    # certified inputs really keep their float prediction
    assert bool((q(_inputs(x)).argmax(1)[r.certified] == m(_inputs(x)).argmax(1)[r.certified]).all())


def test_frozen_unfolded_and_partly_float_models_are_bounded_too(rescnn, quantized):
    m, x, _ = rescnn
    xs = _inputs(x[:150])
    q = quantized(m, 4, 8)
    r1 = _check_sound(m, q, xs)
    lb.freeze(q)
    r2 = _check_sound(m, q, xs)
    torch.testing.assert_close(r1.bound, r2.bound)
    _check_sound(m, quantized(m, 4, 8, fold_bn=False), xs, "worst")     # BatchNorm stays a float layer
    _check_sound(m, quantized(m, 4, 8, fold_bn=False), xs, "exact")
    _check_sound(m, quantized(m, 4, 8, exclude=["fc"]), xs, "exact")    # a float Linear in the graph


def test_w8a8_certifies_most_test_digits(rescnn, quantized):
    m, x, _ = rescnn
    q = quantized(m, 8, 8)
    r = logit_bound(m, q, x)
    assert r.certified_fraction > 0.3
    assert r.as_dict()["violations"] == 0
    # the bound is far from vacuous: within two orders of magnitude of the real change, and the
    # backward (relaxation) pass tightens the interval bound
    assert float(r.bound.median()) < 100 * float(r.measured.median())
    assert float(r.bound.median()) < 0.8 * float(r.interval_bound.median())
    # with q's own rounding the bound is nearly the measured change, and certifies almost everything
    e = logit_bound(m, q, x, rounding="exact")
    assert e.certified_fraction > 0.9 and float((e.measured / e.bound).median()) > 0.5


def test_one_linear_layer_with_weight_error_only_is_bounded_tightly():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 5)).eval()
    q = lb.quantize(m, weights=lb.QuantSpec(bits=4, granularity=lb.PerChannel(0)))
    x = torch.randn(200, 20)
    r = logit_bound(m, q, x)
    # |dW x| is exact; only float roundoff slack separates the bound from the measured change
    assert bool((r.measured <= r.bound).all())
    assert float((r.bound - r.measured).max()) < 1e-4 and float((r.measured / r.bound).median()) > 0.99


class _Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(64, 16), nn.GELU(), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.flatten(1))))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if x.sum() > 0:          # data-dependent control flow: torch.fx cannot trace it
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


def test_unsupported_layers_are_named_and_the_bound_is_unavailable(digits, quantized):
    x = digits[2][:20]
    m = _Gelu().eval()
    r = logit_bound(m, quantized(m, 8, 8), x)
    assert not r.available and any("GELU" in u and "act" in u for u in r.unsupported)
    assert bool(torch.isinf(r.bound).all()) and r.certified_fraction == 0.0
    m = _Branchy().eval()
    r = logit_bound(m, quantized(m, 8, 8), x)
    assert not r.available and "torch.fx" in r.unsupported[0]
    assert bool(torch.isinf(r.bound).all())


def test_bad_input():
    m = nn.Sequential(nn.Linear(4, 2)).eval()
    q = lb.quantize(m)
    with pytest.raises(TypeError, match="x must be"):
        logit_bound(m, q, [torch.zeros(1, 4)])
    with pytest.raises(ValueError, match="first"):
        logit_bound(q, m, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="rounding"):
        logit_bound(m, q, torch.zeros(1, 4), rounding="up")
