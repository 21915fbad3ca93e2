"""Entropy (KL-divergence) calibration: the clipping threshold of TensorRT, MXNet and ONNX Runtime.

Migacz, "8-bit Inference with TensorRT", GTC 2017; the signed-histogram form is MXNet's
``_get_optimal_threshold``, which ONNX Runtime's ``HistogramCollector.get_entropy_threshold``
copies. Given a histogram ``h`` of ``B`` bins over ``[-M, M]`` (``z = B/2`` is the bin starting
at 0) and ``Q`` quantized bins, every candidate ``i = Q//2 .. B/2`` clips to the bins
``[z-i, z+i+1)`` (threshold ``(i+1) M / (B/2)``) and compares two distributions on them:

* the reference ``p``: the clipped histogram with the outliers folded into its two end bins;
* the candidate ``q``: the clipped histogram (without outliers) merged into ``Q`` chunks of
  ``m = L // Q`` bins (the last chunk takes the remainder), each chunk's mass spread evenly over
  the chunk's bins where ``p`` is non-zero.

Both are smoothed (zeros get ``eps = 1e-4``, taken evenly off the non-zeros) and normalised; the
threshold minimises ``KL(p || q)``. ONNX Runtime's loop additionally truncates ``q`` to integers
and leaves the remainder bins of the last chunk at 0 (``variant="onnxruntime"``, the default,
reproduces that loop exactly; ``variant="mxnet"`` is the reference without those two steps, which
can land tens of bins away).

ORT computes each divergence in float32 with ~1e-4 relative round-off, so when two distant
candidates are that close (a flat minimum) the two implementations may pick either; otherwise
they agree to the bin. Unlike the reference loop (one Python iteration per candidate), all candidates of a row are
evaluated at once as a ``[candidates, bins]`` tensor.
"""
from __future__ import annotations

import torch

__all__ = ["entropy_threshold", "kl_curve", "ENTROPY_VARIANTS"]

ENTROPY_VARIANTS = ("onnxruntime", "mxnet")

_EPS = 1e-4


def _smooth(p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MXNet/ORT smoothing over the bins where ``valid``; rows with no mass give NaN."""
    nz = (p != 0) & valid
    zeros = (p == 0) & valid
    n_nz = nz.sum(dim=1, keepdim=True).to(p.dtype)
    n_z = zeros.sum(dim=1, keepdim=True).to(p.dtype)
    eps1 = _EPS * n_z / n_nz.clamp_min(1)
    out = torch.where(nz, p - eps1, torch.where(zeros, torch.full_like(p, _EPS), torch.zeros_like(p)))
    return torch.where(n_nz > 0, out, torch.full_like(p, float("nan")))


def kl_curve(hist: torch.Tensor, quantized_bins: int, variant: str = "onnxruntime") -> torch.Tensor:
    """KL divergence of every candidate for one histogram ``hist [B]`` (see module docstring).

    Returns a float64 tensor of length ``B/2 - Q//2 + 1`` (candidate ``i = Q//2 + index``);
    ``inf`` where a distribution is empty.
    """
    ort_compat = variant == "onnxruntime"
    h = hist.to(torch.float64)
    b = h.numel()
    z = b // 2
    qn = quantized_bins
    dev = h.device
    i = torch.arange(qn // 2, z + 1, device=dev)
    start = z - i
    stop = torch.clamp(z + i + 1, max=b)
    length = stop - start
    merged = length // qn
    k = torch.arange(b, device=dev)
    inside = (k >= start[:, None]) & (k < stop[:, None])
    sliced = torch.where(inside, h, torch.zeros((), dtype=h.dtype, device=dev))
    cum = torch.cat([torch.zeros(1, dtype=h.dtype, device=dev), h.cumsum(0)])
    left, right = cum[start], cum[-1] - cum[stop]
    p = sliced.clone()
    rows = torch.arange(i.numel(), device=dev)
    p[rows, start] += left
    p[rows, stop - 1] += right
    rel = (k - start[:, None]).clamp_min(0)
    chunk = torch.clamp(rel // merged[:, None], max=qn - 1)
    chunk = torch.where(inside, chunk, torch.full_like(chunk, qn))  # qn = "outside" sink
    sums = torch.zeros(i.numel(), qn + 1, dtype=h.dtype, device=dev).scatter_add_(1, chunk, sliced)
    if ort_compat:  # ORT: the remainder bins count in the last chunk's mass but get no share of it
        spread = inside & (rel < merged[:, None] * qn)
    else:
        spread = inside
    nonzero = ((p != 0) & spread).to(h.dtype)
    norm = torch.zeros_like(sums).scatter_add_(1, chunk, nonzero)
    per_bin = sums.gather(1, chunk) / norm.gather(1, chunk).clamp_min(1)
    if ort_compat:
        q = torch.where(spread & (norm.gather(1, chunk) > 0), per_bin.floor(), torch.zeros_like(per_bin))
    else:
        q = torch.where(spread & (p != 0), per_bin, torch.zeros_like(per_bin))
    ps, qs = _smooth(p, inside), _smooth(q, inside)
    if ort_compat:  # ORT smooths, normalises and sums in float32
        ps, qs = ps.float(), qs.float()
    pn = ps / ps.sum(dim=1, keepdim=True)
    qnorm = qs / qs.sum(dim=1, keepdim=True)
    terms = torch.where(inside & (pn > 0), pn * torch.log(pn / qnorm), torch.zeros_like(pn))
    kl = terms.sum(dim=1).double()
    return torch.where(torch.isnan(kl), torch.full_like(kl, float("inf")), kl)


def entropy_threshold(hist: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, quantized_bins: int,
                      variant: str = "onnxruntime") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping range ``(lo', hi')`` minimising the KL divergence.

    Args:
        hist: ``[rows, B]`` counts on ``B`` equal bins of ``[-M, M]`` per row (``M`` = max|x|).
        lo, hi: per-row finite min and max (the threshold is clipped to them, as ONNX Runtime does).
        quantized_bins: ``Q``, the number of grid steps (255 for an 8-bit grid).

    If ``Q >= B`` there is no candidate and the full range ``[lo, hi]`` is returned.
    """
    rows, b = hist.shape
    if variant not in ENTROPY_VARIANTS:
        raise ValueError(f"variant must be one of {ENTROPY_VARIANTS}, got {variant!r}")
    if quantized_bins < 2:
        raise ValueError(f"quantized_bins must be >= 2, got {quantized_bins}")
    if quantized_bins >= b:
        return lo.clone(), hi.clone()
    m = torch.maximum(lo.abs(), hi.abs()).to(torch.float64)
    width = 2 * m / b
    best = torch.empty(rows, dtype=torch.int64, device=hist.device)
    for r in range(rows):  # a [candidates, bins] tensor per row; rows are few for activations
        kl = kl_curve(hist[r], quantized_bins, variant)
        if variant == "onnxruntime":  # ORT keeps each divergence in float32; ties go to the first
            kl = kl.to(torch.float32)
        best[r] = int(torch.nonzero(kl == kl.min())[0, 0]) + quantized_bins // 2
    new_lo = torch.maximum(-best * width, lo.to(torch.float64))
    new_hi = torch.minimum(torch.clamp(best + 1, max=b // 2) * width, hi.to(torch.float64))
    return new_lo.to(lo.dtype), new_hi.to(hi.dtype)
