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


def _former_histogram_search(x, spec):
    """The former large-tensor path: a 2,048-bin histogram per row and the modelled error."""
    from lowbit.ops.histogram import histogram_rows, row_minmax, span_exponent
    from lowbit.ops.ranges import mse_from_histogram
    rows = ops.to_rows(x, spec)
    lo, hi, finite = row_minmax(rows)
    e = span_exponent(torch.maximum(lo.abs(), hi.abs()))
    lo, hi = mse_from_histogram(histogram_rows(rows, e, 2048, finite), e, lo, hi, spec)
    s, z = ops.range_to_qparams(lo, hi, spec)
    return ops.from_rows(s, x.shape, spec), ops.from_rows(z, x.shape, spec)


def _row_sq_err(x, spec, s, z):
    return ops.to_rows((ops.fake_quantize(x, spec, s, z) - x).double().square(), spec).nansum(dim=1)


GROUP_SPECS = [QuantSpec(bits=4, granularity=PerGroup(128)),
               QuantSpec(bits=4, symmetric=False, granularity=PerGroup(128)),
               QuantSpec(bits=3, granularity=PerGroup(64)),
               QuantSpec(bits=8, granularity=PerChannel(0))]


@pytest.mark.parametrize("spec", GROUP_SPECS, ids=str)
def test_grid_search_is_no_worse_than_the_former_histogram_model(spec):
    x = torch.cat([_laplace((96, 512), seed=5).float(), torch.randn(96, 512, generator=torch.Generator().manual_seed(6))])
    s, z = ops.choose_qparams(x, spec, observer="mse", exact_limit=0)
    s_old, z_old = _former_histogram_search(x, spec)
    assert ops.quant_error(x, spec, s, z).mse <= ops.quant_error(x, spec, s_old, z_old).mse * (1 + 1e-4)


@pytest.mark.parametrize("spec", GROUP_SPECS[:3], ids=str)
def test_grid_search_beats_every_point_of_its_first_grid_row_by_row(spec):
    """Brute force over the same first-stage candidates (ratios i/20 of the full range), scored by
    fake quantization through the public ops: the search returns no row worse than their best."""
    x = _laplace((64, 256), seed=7, outliers=4, magnitude=12.0).float()
    s, z = ops.choose_qparams(x, spec, observer="mse", exact_limit=0, candidates=20)
    ours = _row_sq_err(x, spec, s, z)
    rows = ops.to_rows(x, spec)
    lo, hi = ops.RANGE_METHODS["minmax"](rows, spec)
    best = None
    for i in range(1, 21):
        a = i / 20
        if spec.symmetric:
            r = torch.maximum(lo.abs(), hi.abs()) * a
            ls, zs = ops.range_to_qparams(-r, r, spec)
        else:  # the zero point of the full range is kept, the scale shrinks by a
            s_full, z_full = ops.range_to_qparams(lo, hi, spec)
            ls, zs = s_full * a, z_full
        err = _row_sq_err(x, spec, ops.from_rows(ls, x.shape, spec), ops.from_rows(zs, x.shape, spec))
        best = err if best is None else torch.minimum(best, err)
    assert bool((ours <= best * (1 + 1e-5) + 1e-12).all()), float((ours / best).max())


def test_grid_search_slices_long_rows_and_matches_one_pass():
    """Rows longer than the work budget are processed in column slices: same scales."""
    from lowbit.ops.mse import grid_limits
    from lowbit.ops.mse_search import mse_scale_search
    from lowbit.ops.histogram import row_minmax
    x = _laplace((3, 20000), seed=8).float()
    lo, hi, _ = row_minmax(x)
    s_full, _, pos, neg = grid_limits(lo, hi, QuantSpec(bits=4))
    whole = mse_scale_search(x, s_full, pos, neg, work_elements=1 << 22)
    sliced = mse_scale_search(x, s_full, pos, neg, work_elements=4096)
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=0)
