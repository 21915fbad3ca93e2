"""lowbit.ops.clip_sweep: the saturation/rounding trade-off, consistent with ops.quant_error."""
import pytest
import torch

from lowbit import PerChannel, PerGroup, QuantSpec, ops


@pytest.fixture
def laplace():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(8, 512, generator=g) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=8, signed=False, symmetric=False),
                                  QuantSpec(bits=4, granularity=PerChannel(0)),
                                  QuantSpec(bits=3, granularity=PerGroup(64, -1), symmetric=False)])
def test_parts_add_up_and_match_quant_error(laplace, spec):
    ratios = torch.linspace(0.1, 1.0, 12)
    sw = ops.clip_sweep(laplace, spec, ratios)
    assert torch.allclose(sw.clip_mse + sw.round_mse, sw.mse, rtol=1e-12, atol=0)
    # an independent point: ratio 1 is the plain max-abs / min-max rule of choose_qparams
    name = "maxabs" if spec.symmetric else "minmax"
    s, z = ops.choose_qparams(laplace, spec, observer=name)
    ref = ops.quant_error(laplace, spec, s, z)
    assert sw.mse[-1].item() == pytest.approx(ref.mse, rel=1e-6)
    assert sw.clip_fraction[-1].item() == 0.0
    assert torch.allclose(sw.full_scale, s)


def test_the_curve_is_u_shaped_on_heavy_tails(laplace):
    sw = ops.clip_sweep(laplace, QuantSpec(bits=4), torch.linspace(0.05, 1.0, 40))
    best = int(torch.argmin(sw.mse))
    assert 0 < best < 39  # interior minimum: neither extreme is best
    assert bool((sw.clip_fraction[1:] <= sw.clip_fraction[:-1]).all())  # wider range clips less
    assert sw.round_mse[-1] > sw.round_mse[0]
    assert sw.clip_mse[0] > sw.clip_mse[-1]
    assert sw.best_ratio() == pytest.approx(float(sw.ratios[best]))
    assert set(sw.as_dict()) == {"ratios", "mse", "clip_mse", "round_mse", "clip_fraction", "sqnr_db"}


@pytest.mark.parametrize("ratios", [[], [0.5, -1.0], [float("nan")], [0.0]])
def test_bad_ratios_are_named(laplace, ratios):
    with pytest.raises(ValueError, match="ratios"):
        ops.clip_sweep(laplace, QuantSpec(), ratios)


def test_bad_inputs():
    with pytest.raises(TypeError, match="x"):
        ops.clip_sweep(torch.arange(4), QuantSpec(), [1.0])
    with pytest.raises(TypeError, match="ratios"):
        ops.clip_sweep(torch.randn(4), QuantSpec(), "abc")
    with pytest.raises(ValueError, match="finite"):
        ops.clip_sweep(torch.full((4,), float("nan")), QuantSpec(), [1.0])
