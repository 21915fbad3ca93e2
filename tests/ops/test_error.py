"""quant_error: the split into clipping and rounding, checked against direct computation and theory."""
import math

import pytest
import torch

from lowbit import PerChannel, PerGroup, PerTensor, QuantSpec, ops


def _direct(x, spec, scale, zp):
    """mse, clip_mse, clip_fraction from fake_quantize and an independent saturation test (float64)."""
    y = ops.fake_quantize(x, spec, scale, zp).double()
    s = ops.params.broadcast_param(scale, x.shape, spec).float()
    z = ops.params.broadcast_param(zp, x.shape, spec).double()
    v = torch.round(x.float() / s).double() + z
    sat = ((v < spec.qmin) | (v > spec.qmax)).expand(x.shape)
    e2 = (y - x.double()) ** 2
    n = x.numel()
    return float(e2.sum()) / n, float(e2[sat].sum()) / n, float(sat.sum()) / n


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=8), QuantSpec(bits=4, symmetric=False, granularity=PerChannel(0)),
    QuantSpec(bits=3, granularity=PerGroup(5, 1)), QuantSpec(bits=2, signed=False, symmetric=False),
], ids=str)
def test_split_matches_a_direct_computation(spec):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 13, generator=gen)
    scale, zp = ops.choose_qparams(x * 0.6, spec)          # a narrow range: the tails clip
    err = ops.quant_error(x, spec, scale, zp)
    mse, clip, frac = _direct(x, spec, scale, zp)
    assert err.mse == pytest.approx(mse, rel=1e-12)
    assert err.clip_mse == pytest.approx(clip, rel=1e-12)
    assert err.clip_fraction == frac and 0 < frac < 1
    assert err.clip_mse + err.round_mse == pytest.approx(err.mse, rel=1e-12)
    assert err.round_mse > 0
    signal = float((x.double() ** 2).mean())
    assert err.sqnr_db == pytest.approx(10 * math.log10(signal / mse), rel=1e-9)
    assert set(err.as_dict()) == {"mse", "clip_mse", "round_mse", "clip_fraction", "sqnr_db"}


def test_rounding_error_of_a_fine_grid_is_a_twelfth_of_a_step_squared():
    """Uniform rounding noise (Widrow): E[(x - Q(x))^2] = s^2 / 12 when the data spans many steps."""
    x = torch.rand(400_000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spec = QuantSpec(bits=8)
    scale, zp = ops.choose_qparams(x, spec, "maxabs")
    err = ops.quant_error(x, spec, scale, zp)
    assert err.clip_mse == 0.0
    assert err.mse == pytest.approx(float(scale) ** 2 / 12, rel=0.02)


def test_exact_grid_points_have_no_error_and_infinite_sqnr():
    x = torch.tensor([0.0, 0.5, -1.0, 63.5])
    err = ops.quant_error(x, QuantSpec(bits=8), 0.5, 0)
    assert err.mse == 0.0 and err.sqnr_db == math.inf and err.clip_fraction == 0.0


def test_nonfinite_elements_are_skipped():
    spec = QuantSpec(bits=8)
    x = torch.tensor([0.3, math.nan, math.inf, -0.7, -math.inf])
    err = ops.quant_error(x, spec, 0.1, 0)
    ref = ops.quant_error(x[[0, 3]], spec, 0.1, 0)
    assert err == ref
    with pytest.raises(ValueError, match="finite"):
        ops.quant_error(torch.tensor([math.nan]), spec, 0.1, 0)


def test_zero_signal():
    err = ops.quant_error(torch.zeros(4), QuantSpec(), 1.0, 0)
    assert err.mse == 0.0 and err.sqnr_db == math.inf
    err = ops.quant_error(torch.zeros(4), QuantSpec(bits=8, signed=False, symmetric=False), 1.0, 3)
    assert err.mse == 0.0


def test_stochastic_error_uses_the_generator():
    spec = QuantSpec(bits=4, rounding="stochastic", granularity=PerTensor())
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    scale, zp = ops.choose_qparams(x, spec)
    a = ops.quant_error(x, spec, scale, zp, generator=torch.Generator().manual_seed(3))
    b = ops.quant_error(x, spec, scale, zp, generator=torch.Generator().manual_seed(3))
    y = ops.fake_quantize(x, spec, scale, zp, generator=torch.Generator().manual_seed(3))
    assert a == b
    assert a.mse == pytest.approx(float(((y.double() - x.double()) ** 2).mean()), rel=1e-12)
    # stochastic rounding: E[err^2] = s^2 p(1-p) per element, between 0 and s^2/4
    nearest = ops.quant_error(x, spec.replace(rounding="nearest"), scale, zp)
    assert nearest.mse < a.mse < float(scale) ** 2 / 4
