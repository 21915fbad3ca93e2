"""lowbit.ops.entropy: the KL threshold is ONNX Runtime's, found without its Python loop."""
import contextlib
import io

import numpy as np
import pytest
import torch

from lowbit import QuantSpec, ops
from lowbit.ops.entropy import entropy_threshold, kl_curve, kl_curve_fast

calibrate = pytest.importorskip("onnxruntime.quantization.calibrate")


def _ort_collector(q, bins=2048):
    return calibrate.HistogramCollector(method="entropy", symmetric=False, num_bins=bins,
                                        num_quantized_bins=q, percentile=None, scenario="same")


def _data(kind, n=60000, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(n, generator=g)
    if kind == "laplace":
        u = torch.rand(n, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    if kind == "relu":
        return torch.relu(torch.randn(n, generator=g))
    if kind == "outliers":
        x = torch.randn(n, generator=g)
        x[:5] = torch.tensor([25.0, -18.0, 30.0, 12.0, -40.0])
        return x
    raise ValueError(kind)


# ORT's loop is slow (about a second per 2048-bin search): one case at the default 2048 bins,
# the others on 512 bins (the algorithm is the same, with a quarter of the candidates)
@pytest.mark.parametrize("kind,q,bins", [("gauss", 128, 2048), ("laplace", 255, 512), ("relu", 128, 512),
                                         ("outliers", 255, 512), ("gauss", 255, 512), ("laplace", 128, 512)])
def test_one_shot_entropy_matches_onnxruntime_calibrator(kind, q, bins):
    x = _data(kind)
    c = _ort_collector(q, bins)
    with contextlib.redirect_stdout(io.StringIO()):
        c.collect({"t": x.numpy()})
        lo_ref, hi_ref = (float(v) for v in c.compute_collection_result()["t"][:2])
    m = float(x.abs().max())
    bin_width = 2 * m / bins
    lo, hi = ops.RANGE_METHODS["entropy"](x.reshape(1, -1), QuantSpec(), quantized_bins=q, bins=bins,
                                          variant="onnxruntime")
    if abs(float(hi) - hi_ref) > bin_width or abs(float(lo) - lo_ref) > bin_width:
        # allowed only for a near-tie that ORT's float32 sums decide by round-off (its divergences
        # carry ~1e-4 relative error): then both candidates must have the same divergence
        hist = torch.histc(x.double(), bins, -m, m)
        kl = kl_curve(hist, q)
        ours = round(-float(lo) / bin_width) - q // 2
        theirs = round(-lo_ref / bin_width) - q // 2
        assert abs(float(kl[ours] - kl[theirs])) <= 1e-3 * float(kl[theirs]), (float(hi), hi_ref)
        return
    scale, zp = ops.choose_qparams(x, QuantSpec(), observer="entropy", quantized_bins=q, bins=bins,
                                   variant="onnxruntime")
    assert float(scale) == pytest.approx(max(abs(lo_ref), abs(hi_ref)) / 127, rel=1e-3)


@pytest.mark.parametrize("seed,q", [(0, 128), (1, 100), (2, 63)])
def test_search_matches_onnxruntime_on_arbitrary_histograms(seed, q):
    g = torch.Generator().manual_seed(seed)
    # lumpy histograms with empty bins (the shape ORT's loop is most sensitive to), and chunk
    # sizes with remainders (q not dividing the slice)
    hist = (torch.rand(512, generator=g) ** 4 * 50).floor() * (torch.rand(512, generator=g) > 0.2)
    hist[256 - 80: 256 + 80] += 200
    edges = np.linspace(-3.0, 3.0, 513, dtype=np.float32)
    ref = _ort_collector(q, 512).get_entropy_threshold(
        (hist.numpy().astype(np.int64), edges, np.float32(-3.0), np.float32(3.0)), q)
    lo, hi = entropy_threshold(hist[None], torch.tensor([-3.0]), torch.tensor([3.0]), q)
    assert float(hi) == pytest.approx(float(ref[1]), abs=6.0 / 512)
    assert float(lo) == pytest.approx(float(ref[0]), abs=6.0 / 512)


def test_without_candidates_the_full_range_is_kept():
    hist = torch.ones(1, 64)
    lo, hi = entropy_threshold(hist, torch.tensor([-1.0]), torch.tensor([2.0]), 255)
    assert (float(lo), float(hi)) == (-1.0, 2.0)


def test_bad_options_are_named():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="variant"):
        ops.choose_qparams(x, QuantSpec(), observer="entropy", variant="trt")
    with pytest.raises(ValueError, match="quantized_bins"):
        ops.choose_qparams(x, QuantSpec(), observer="entropy", quantized_bins=1)
    with pytest.raises(ValueError, match="bins"):
        ops.choose_qparams(x, QuantSpec(), observer="entropy", bins=1000)


@pytest.mark.parametrize("variant", ["onnxruntime", "mxnet"])
@pytest.mark.parametrize("seed", range(3))
def test_prefix_sum_form_equals_the_dense_reference(variant, seed):
    g = torch.Generator().manual_seed(seed)
    hists = [torch.histc(torch.randn(50000, generator=g), 1024, -4.5, 4.5),
             (torch.rand(512, generator=g) ** 4 * 50).floor() * (torch.rand(512, generator=g) > 0.3),
             torch.rand(256, generator=g) * 1e-3]  # fractional counts: the dense fallback
    for hist in hists:
        for q in (255, 100, 63):
            dense, fast = kl_curve(hist, q, variant), kl_curve_fast(hist, q, variant)
            finite = torch.isfinite(dense)
            assert torch.equal(finite, torch.isfinite(fast))
            # the dense onnxruntime form rounds to float32 like ORT; the fast one stays in float64
            tol = 1e-4 if variant == "onnxruntime" else 1e-9
            assert torch.allclose(fast[finite], dense[finite], rtol=tol, atol=0)
