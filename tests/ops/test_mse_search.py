"""lowbit.ops.mse / choose_qparams(observer="mse"): the MSE-optimal clipping range."""
import pytest
import torch

from lowbit import PerChannel, PerGroup, QuantSpec, ops


def _laplace(shape, seed=0, outliers=0, magnitude=40.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    if outliers:
        flat = x.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:outliers]
        flat[idx] = magnitude * torch.sign(torch.randn(outliers, generator=g, dtype=torch.float64))
    return x


def _exact_mse(x, spec, scale, zp):
    return ops.quant_error(x, spec, scale, zp).mse


def _brute_force(x, spec, grid=800):
    """Exact MSE of every range r * full_range (r on a fine grid), per tensor: the best value."""
    name = "maxabs" if spec.symmetric else "minmax"
    rows = ops.to_rows(x, spec)
    best = None
    for r in torch.linspace(0.005, 1.0, grid, dtype=torch.float64):
        lo, hi = ops.RANGE_METHODS[name](rows, spec)
        s, z = ops.range_to_qparams(lo * r, hi * r, spec)
        err = (ops.fake_quantize(x, spec, ops.from_rows(s, x.shape, spec), ops.from_rows(z, x.shape, spec)) - x)
        per_row = ops.to_rows(err.square(), spec).nanmean(dim=1)
        best = per_row if best is None else torch.minimum(best, per_row)
    return best


SPECS = [QuantSpec(bits=4), QuantSpec(bits=8), QuantSpec(bits=4, signed=False, symmetric=False),
         QuantSpec(bits=3, granularity=PerChannel(0)), QuantSpec(bits=4, granularity=PerGroup(32, -1), symmetric=False),
         QuantSpec(bits=2, narrow_range=True)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_exact_search_is_no_worse_than_a_fine_brute_force_grid(spec):
    x = _laplace((6, 96), seed=1, outliers=3)
    s, z = ops.choose_qparams(x, spec, observer="mse")
    ours = ops.to_rows((ops.fake_quantize(x, spec, s, z) - x).square(), spec).nanmean(dim=1)
    ref = _brute_force(x, spec)
    assert bool((ours <= ref * (1 + 1e-9) + 1e-15).all()), (ours / ref)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=8, signed=False, symmetric=False),
                                  QuantSpec(bits=4, granularity=PerChannel(0))], ids=str)
def test_histogram_search_is_close_to_the_exact_optimum_on_large_tensors(spec):
    x = _laplace((4, 40000), seed=2).float()
    s, z = ops.choose_qparams(x, spec, observer="mse", exact_limit=0)  # force the histogram path
    s_exact, z_exact = ops.choose_qparams(x[:, :2000], spec, observer="mse")
    got = _exact_mse(x, spec, s, z)
    brute = float(_brute_force(x, spec, grid=200).mean()) if isinstance(spec.granularity, PerChannel) else float(_brute_force(x, spec, grid=200))
    assert got <= brute * 1.03
    assert s_exact.shape == s.shape


@pytest.mark.parametrize("bits,gain", [(4, 0.5), (8, 0.99)])
def test_mse_beats_maxabs_on_heavy_tails(bits, gain):
    spec = QuantSpec(bits=bits)
    x = _laplace((20000,), seed=3, outliers=5, magnitude=16.0).float()
    for kw in ({}, {"exact_limit": 0}):
        s, z = ops.choose_qparams(x, spec, observer="mse", **kw)
        s_max, z_max = ops.choose_qparams(x, spec, observer="maxabs")
        assert _exact_mse(x, spec, s, z) < gain * _exact_mse(x, spec, s_max, z_max)


@pytest.mark.parametrize("value", [0.0, 3.0, -0.7])
def test_constant_rows_get_a_valid_scale_and_round_trip(value):
    x = torch.full((4, 10), value)
    for spec in (QuantSpec(bits=4), QuantSpec(bits=8, signed=False, symmetric=False)):
        s, z = ops.choose_qparams(x, spec, observer="mse")
        assert bool(torch.isfinite(s).all()) and float(s.min()) > 0
        assert torch.equal(ops.fake_quantize(x, spec, s, z), x)


def test_non_finite_values_are_ignored():
    x = _laplace((500,), seed=4).float()
    dirty = torch.cat([x, torch.tensor([float("-inf"), float("nan"), float("inf")])])
    spec = QuantSpec(bits=4)
    assert torch.equal(ops.choose_qparams(dirty, spec, observer="mse")[0], ops.choose_qparams(x, spec, observer="mse")[0])
