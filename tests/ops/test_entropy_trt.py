"""lowbit.ops.entropy_trt: TensorRT's KL search, against a direct port of its Python loop."""
from collections import Counter

import numpy as np
import pytest
import torch

from lowbit import QuantSpec, ops
from lowbit.ops.entropy_trt import kl_curve_tensorrt, tensorrt_quantized_bins, tensorrt_threshold

stats = pytest.importorskip("scipy.stats")


def _trt_reference(hist: np.ndarray, edges: np.ndarray, nbins: int, start_bin: int = 128):
    """pytorch-quantization's ``_compute_amax_entropy`` (stride 1), loop for loop; returns
    (amax, divergences). Only the in-place edit of the caller's histogram is left out."""
    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    divergences = []
    for i in range(start_bin, len(bins) + 1):
        space = np.linspace(0, i, num=nbins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        counts = np.zeros(nbins)
        for idx, d in enumerate(digitized):
            if d != -1:
                counts[d] += bins[idx]
        for key, val in Counter(digitized).items():
            if key != -1:
                counts[key] = counts[key] / val
        new_density = np.array([counts[d] if d != -1 else 0.0 for d in digitized])
        reference = bins[:i].copy()
        reference[-1] += bins[i:].sum()
        divergences.append(stats.entropy(reference, new_density))
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    return float(edges[last_argmin + start_bin]), divergences


def _data(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "relu":     # half exact zeros: the spike TensorRT's h[0] = h[1] is for
        return torch.relu(torch.randn(n, generator=g))
    if kind == "laplace":
        u = torch.rand(n, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    x = torch.randn(n, generator=g)
    x[:3] = torch.tensor([14.0, -9.0, 11.0])
    return x


@pytest.mark.parametrize("kind,nbins,seed", [("relu", 128, 0), ("relu", 256, 1), ("laplace", 128, 2),
                                             ("outliers", 128, 3)])
def test_threshold_and_curve_match_tensorrts_loop(kind, nbins, seed):
    x = _data(kind, 20000, seed)
    b = 384   # fewer bins than TensorRT's 2048 keeps the reference loop fast; the algorithm is the same
    m = float(x.abs().max())
    hist = torch.histc(x.abs().double(), b, 0, m)
    before = hist.clone()
    edges = np.linspace(0, m, b + 1)
    ref_amax, ref_kl = _trt_reference(hist.numpy(), edges, nbins)
    h = hist.clone()
    h[0] = h[1]
    kl = kl_curve_tensorrt(h, nbins).numpy()
    finite = np.isfinite(ref_kl)
    assert np.array_equal(finite, np.isfinite(kl))
    np.testing.assert_allclose(kl[finite], ref_kl[finite], rtol=1e-9, atol=1e-12)
    t = tensorrt_threshold(hist[None], torch.tensor([m / b], dtype=torch.float64), nbins)
    assert float(t) == pytest.approx(ref_amax, abs=1e-9 * m)
    assert torch.equal(hist, before)   # the input histogram is left as it was


def test_one_shot_range_is_tensorrts_threshold():
    x = _data("relu", 20000, 5)
    m = float(x.max())
    hist = torch.histc(x.double(), 512, 0, m)
    ref_amax, _ = _trt_reference(hist.numpy(), np.linspace(0, m, 513), 128)
    spec = QuantSpec()   # signed symmetric: TensorRT's own case, Q = 128
    lo, hi = ops.RANGE_METHODS["entropy"](x.reshape(1, -1), spec, bins=512)
    assert float(lo) == 0.0
    assert float(hi) == pytest.approx(ref_amax, rel=1e-6)


def test_quantized_bins_follow_the_grid():
    lo, hi = torch.tensor([0.0, -1.0, -2.0, -3.0]), torch.tensor([5.0, 1.0, 0.0, 8.0])
    signed_sym = tensorrt_quantized_bins(QuantSpec(), lo, hi)
    assert signed_sym.tolist() == [128, 128, 128, 128]                      # TensorRT: 1 << (b - 1)
    affine = tensorrt_quantized_bins(QuantSpec(symmetric=False), lo, hi)
    assert affine[0] == 256 and affine[2] == 256                            # one-sided: every level
    assert 128 <= int(affine[1]) <= 129                                     # two-sided evenly: half
    assert int(affine[3]) == 256 - round(3 / (11 / 255))                    # its share of 256
    assert tensorrt_quantized_bins(QuantSpec(bits=4, signed=False, symmetric=False), lo[:1], hi[:1]) == 16
    assert tensorrt_quantized_bins(QuantSpec(narrow_range=True), lo[:1], hi[:1]) == 128


@pytest.mark.parametrize("observer", ["one-shot", "streaming"])
def test_relu_outputs_keep_most_of_their_range(observer):
    """The failure this variant fixes: ONNX Runtime's search clips a ReLU output (half exact
    zeros) at ~1/8 of its max. TensorRT's search must stay within 1 dB of min/max's SQNR."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(64, 4096, generator=g) * torch.rand(64, 1, generator=g).add(0.5))
    spec = QuantSpec(symmetric=False)
    if observer == "one-shot":
        qp = ops.choose_qparams(x, spec, observer="entropy")
        qp_ort = ops.choose_qparams(x, spec, observer="entropy", variant="onnxruntime")
    else:
        from lowbit.observers import Entropy

        obs, ort = Entropy(spec), Entropy(spec, variant="onnxruntime")
        for b in x.split(8):
            obs.update(b)
            ort.update(b)
        qp, qp_ort = obs.qparams(), ort.qparams()
    minmax = ops.quant_error(x, spec, *ops.choose_qparams(x, spec, observer="minmax"))
    trt = ops.quant_error(x, spec, *qp)
    ort_err = ops.quant_error(x, spec, *qp_ort)
    assert trt.clip_fraction < 1e-3
    assert trt.sqnr_db >= minmax.sqnr_db - 1.0
    assert ort_err.sqnr_db < minmax.sqnr_db - 6.0   # the old behaviour, for contrast


def test_bad_variant_is_named():
    with pytest.raises(ValueError, match="variant"):
        ops.choose_qparams(torch.randn(10), QuantSpec(), observer="entropy", variant="trt")


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(symmetric=False), QuantSpec(bits=4)])
def test_streaming_observer_is_as_good_as_the_one_shot_search(spec):
    """The observer searches the folded power-of-two histogram instead of one over [0, max|x|]:
    a coarser grid of candidates on the same curve, so the error must be as good within 1 dB."""
    from lowbit.observers import Entropy

    g = torch.Generator().manual_seed(1)
    u = torch.rand(40, 2048, generator=g) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    obs = Entropy(spec)
    for b in x.split(5):
        obs.update(b)
    streaming = ops.quant_error(x, spec, *obs.qparams()).sqnr_db
    one_shot = ops.quant_error(x, spec, *ops.choose_qparams(x, spec, observer="entropy")).sqnr_db
    assert streaming >= one_shot - 1.0
