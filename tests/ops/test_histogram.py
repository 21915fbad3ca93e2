"""lowbit.ops.histogram: exact binning on power-of-two spans, growth, resampling, quantiles."""
import numpy as np
import pytest
import torch

from lowbit.ops.histogram import (check_bins, fold_histogram, grow_histogram, histogram_between,
                                  histogram_quantile, histogram_rows, resample_histogram, span_exponent, span_of)


def _np_hist(row, t, bins):
    return np.histogram(row, bins=bins, range=(-t, t))[0]


def test_span_exponent_is_the_smallest_power_of_two_covering():
    m = torch.tensor([0.3, 0.5, 1.0, 1.5, 1024.0, 1e-30, 0.0])
    e = span_exponent(m)
    t = span_of(e)
    assert bool((t[:-1] >= m[:-1].double()).all()) and bool((t[:-1] / 2 < m[:-1].double()).all())
    assert float(t[-1]) == 0.0


def test_histogram_rows_matches_numpy_on_the_same_span():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5000, generator=g) * torch.tensor([[0.1], [3.0], [100.0]])
    e = span_exponent(x.abs().amax(1))
    counts = histogram_rows(x, e, 256)
    for r in range(3):
        ref = _np_hist(x[r].double().numpy(), float(span_of(e)[r]), 256)
        assert np.array_equal(counts[r].numpy(), ref)


def test_non_finite_values_are_not_counted():
    x = torch.tensor([[1.0, float("nan"), -float("inf"), 0.25, float("inf")]])
    counts = histogram_rows(x, span_exponent(torch.tensor([1.0])), 8)
    assert int(counts.sum()) == 2


def test_growing_equals_binning_directly_on_the_wider_span():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4000, generator=g)
    e = span_exponent(x.abs().amax(1))
    wider = e + torch.tensor([1, 5])
    grown = grow_histogram(histogram_rows(x, e, 64), e, wider)
    assert torch.equal(grown, histogram_rows(x, wider, 64))
    assert int(grown.sum()) == x.numel()


def test_rows_that_saw_only_zeros_keep_their_counts_when_the_span_appears():
    zeros = torch.zeros(1, 10)
    e0 = span_exponent(torch.zeros(1))
    h = histogram_rows(zeros, e0, 16)
    assert int(h[0, 8]) == 10
    e1 = span_exponent(torch.tensor([3.0]))
    grown = grow_histogram(h, e0, e1) + histogram_rows(torch.tensor([[3.0, -1.0]]), e1, 16)
    direct = histogram_rows(torch.cat([zeros, torch.tensor([[3.0, -1.0]])], 1), e1, 16)
    assert torch.equal(grown, direct)


def test_resample_keeps_the_mass_and_is_exact_on_aligned_bins():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3000, generator=g) * 2 - 1  # inside [-1, 1]
    e = span_exponent(torch.tensor([1.0]))
    fine = histogram_rows(x, e, 64)
    coarse = resample_histogram(fine, span_of(e), torch.tensor([-1.0]), torch.tensor([1.0]), 16)
    assert torch.allclose(coarse, histogram_rows(x, e, 16).double())
    # onto a non-aligned span: mass is kept, and each bin is within one source bin of numpy's
    odd = resample_histogram(fine, span_of(e), torch.tensor([-0.9]), torch.tensor([0.99]), 10)
    ref = np.histogram(x.numpy(), bins=10, range=(-0.9, 0.99))[0]
    assert abs(float(odd.sum()) - ref.sum()) <= 2 * float(fine.max())
    assert np.abs(odd[0].numpy() - ref).max() <= 2 * float(fine.max())


def test_fold_gives_the_histogram_of_the_absolute_value():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2000, generator=g)
    e = span_exponent(x.abs().amax(1))
    t = float(span_of(e)[0])
    folded = fold_histogram(histogram_rows(x, e, 32))
    ref = np.histogram(x.abs().numpy(), bins=16, range=(0, t))[0]
    assert np.array_equal(folded[0].numpy(), ref)


@pytest.mark.parametrize("q", [0.001, 0.25, 0.5, 0.9, 0.9999])
def test_quantile_is_within_one_bin_of_numpy(q):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 20000, generator=g)
    lo, hi = torch.full((2,), -5.0), torch.full((2,), 5.0)
    counts = histogram_between(x, lo, hi, 1000)
    got = histogram_quantile(counts, lo, hi, q)
    width = 10.0 / 1000
    for r in range(2):  # within one bin of the order statistics around the quantile
        lo_q = np.quantile(x[r].numpy(), q, method="lower")
        hi_q = np.quantile(x[r].numpy(), q, method="higher")
        assert lo_q - width <= float(got[r]) <= hi_q + width


def test_histogram_between_matches_numpy():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 7000, generator=g)
    m = x.abs().amax(1)
    counts = histogram_between(x, -m, m, 2048)
    ref = np.histogram(x.double().numpy(), bins=2048, range=(-float(m), float(m)))[0]
    assert np.abs(counts[0].numpy() - ref).sum() <= 2  # float edge ties only


@pytest.mark.parametrize("bins", [3, 100, 0, 2])
def test_bins_must_be_a_power_of_two(bins):
    with pytest.raises(ValueError, match="bins"):
        check_bins(bins)
    with pytest.raises(TypeError, match="bins"):
        check_bins(2048.0)
