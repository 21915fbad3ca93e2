"""Entropy (KL-divergence) calibration: the clipping threshold of TensorRT, MXNet and ONNX Runtime.

Migacz, "8-bit Inference with TensorRT", GTC 2017; the signed-histogram form is MXNet's
``_get_optimal_threshold``, which ONNX Runtime's ``HistogramCollector.get_entropy_threshold``
copies (``variant="tensorrt"``, the default of the observers and of ``choose_qparams``, is
TensorRT's search on ``|x|``: :mod:`lowbit.ops.entropy_trt`). Given a histogram ``h`` of ``B`` bins over ``[-M, M]`` (``z = B/2`` is the bin starting
at 0) and ``Q`` quantized bins, every candidate ``i = Q//2 .. B/2`` clips to the bins
``[z-i, z+i+1)`` (threshold ``(i+1) M / (B/2)``) and compares two distributions on them:

* the reference ``p``: the clipped histogram with the outliers folded into its two end bins;
* the candidate ``q``: the clipped histogram (without outliers) merged into ``Q`` chunks of
  ``m = L // Q`` bins (the last chunk takes the remainder), each chunk's mass spread evenly over
  the chunk's bins where ``p`` is non-zero.

Both are smoothed (zeros get ``eps = 1e-4``, taken evenly off the non-zeros) and normalised; the
threshold minimises ``KL(p || q)``. ONNX Runtime's loop additionally truncates ``q`` to integers
and leaves the remainder bins of the last chunk at 0 (``variant="onnxruntime"`` reproduces that
loop exactly; ``variant="mxnet"`` is the reference without those two steps, which can land tens
of bins away).

ORT computes each divergence in float32 with ~1e-4 relative round-off, so when two distant
candidates are that close (a flat minimum) the two implementations may pick either; otherwise
they agree to the bin. Unlike the reference loop (one Python iteration per candidate), all candidates of a row are
evaluated at once as a ``[candidates, bins]`` tensor.
"""
from __future__ import annotations

import torch

__all__ = ["entropy_threshold", "kl_curve", "kl_curve_fast", "ENTROPY_VARIANTS", "SIGNED_VARIANTS"]

ENTROPY_VARIANTS = ("tensorrt", "onnxruntime", "mxnet")   # tensorrt: lowbit.ops.entropy_trt
SIGNED_VARIANTS = ("onnxruntime", "mxnet")                 # the signed-histogram search of this module

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
    ``inf`` where a distribution is empty. This dense form is the reference;
    :func:`kl_curve_fast` computes the same and is what :func:`entropy_threshold` uses.
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


def kl_curve_fast(hist: torch.Tensor, quantized_bins: int, variant: str = "onnxruntime") -> torch.Tensor:
    """:func:`kl_curve` from prefix sums: ``O(candidates * Q)`` work plus one dense pass for
    ``sum p log p``, instead of a dozen dense ``[candidates, bins]`` passes.

    With ``S_p = sum p`` (smoothing keeps sums) and ``S_q = sum q``::

        KL = (sum p~ log p~ - sum p~ log q~) / S_p - log S_p + log S_q

    and ``q~`` is constant on each chunk (on the bins where ``p != 0`` for MXNet), so the second
    sum needs only per-chunk masses and non-zero counts, read from cumulative sums of ``h`` and
    ``[h != 0]`` (the two end bins, which also hold the outliers, are corrected explicitly). The
    first sum is ``f(h - e)`` with ``f = x log x``, expanded to fourth order in ``e`` (error below
    ``h (e/h)^5 / 16`` per bin), or summed densely for candidates where ``e`` is not small.
    """
    ort = variant == "onnxruntime"
    h = hist.to(torch.float64)
    b, qn, dev = h.numel(), quantized_bins, h.device
    z = b // 2
    f64 = torch.float64
    i = torch.arange(qn // 2, z + 1, device=dev)
    start = z - i
    stop = torch.clamp(z + i + 1, max=b)
    length = stop - start
    m = length // qn
    zero = torch.zeros(1, dtype=f64, device=dev)
    H = torch.cat([zero, h.cumsum(0)])
    NZ = torch.cat([zero, (h != 0).to(f64).cumsum(0)])
    total = H[-1]
    left, right = H[start], total - H[stop]
    last = stop - 1
    # end-bin corrections: p[start] = h[start] + left, p[last] = h[last] + right
    gain_s = ((h[start] == 0) & (left > 0)).to(f64)
    gain_e = ((h[last] == 0) & (right > 0)).to(f64)
    j = torch.arange(qn + 1, device=dev)
    bounds = start[:, None] + j * m[:, None]  # [C, Q+1]: chunk j is [bounds_j, bounds_{j+1})
    if not ort:  # MXNet: the last chunk runs to the end of the slice
        bounds[:, -1] = stop
    mass = H[bounds[:, 1:]] - H[bounds[:, :-1]]  # sliced mass per chunk (no outliers)
    nz = NZ[bounds[:, 1:]] - NZ[bounds[:, :-1]]
    rem_mass = H[stop] - H[bounds[:, -1]]  # ORT's remainder bins (empty for MXNet)
    qb = mass.clone()
    qb[:, -1] += rem_mass
    # p's mass and non-zeros per chunk, with the outliers at the two ends
    pmass = mass.clone()
    pmass[:, 0] += left
    pnz = nz.clone()
    pnz[:, 0] += gain_s
    rem_len = (stop - bounds[:, -1]).to(f64)
    rem_nz = NZ[stop] - NZ[bounds[:, -1]]
    rem_pmass = rem_mass.clone()
    in_rem = last >= bounds[:, -1]  # does the last bin lie in the remainder (ORT only)?
    rem_pmass += torch.where(in_rem, right, torch.zeros_like(right))
    rem_nz += torch.where(in_rem, gain_e, torch.zeros_like(gain_e))
    pmass[:, -1] += torch.where(in_rem, torch.zeros_like(right), right)
    pnz[:, -1] += torch.where(in_rem, torch.zeros_like(gain_e), gain_e)
    nnz_p = pnz.sum(1) + rem_nz
    n0_p = length.to(f64) - nnz_p
    e1p = _EPS * n0_p / nnz_p.clamp_min(1)
    chunk_len = (bounds[:, 1:] - bounds[:, :-1]).to(f64)
    if ort:
        qv = torch.where(pnz > 0, torch.floor(qb / pnz.clamp_min(1)), torch.zeros_like(qb))
        n0_q = (chunk_len * (qv == 0)).sum(1) + rem_len
        s_q = (chunk_len * qv).sum(1)
    else:
        qv = torch.where(pnz > 0, qb / pnz.clamp_min(1), torch.zeros_like(qb))
        n0_q = n0_p + (pnz * (qv == 0)).sum(1)
        s_q = (pnz * qv).sum(1)
    nnz_q = length.to(f64) - n0_q
    e1q = _EPS * n0_q / nnz_q.clamp_min(1)
    log_eps = torch.log(torch.tensor(_EPS, dtype=f64, device=dev))
    log_qt = torch.where(qv != 0, torch.log((qv - e1q[:, None]).clamp_min(1e-300)), log_eps)
    # sum p~ over a chunk: its mass, minus e1p per non-zero, plus eps per zero
    if ort:
        pt = pmass - e1p[:, None] * pnz + _EPS * (chunk_len - pnz)
        rem_pt = rem_pmass - e1p * rem_nz + _EPS * (rem_len - rem_nz)
        t2 = (pt * log_qt).sum(1) + rem_pt * log_eps
    else:  # p == 0 bins pair eps with eps; the others pair p~ with the chunk's q~
        pt = pmass - e1p[:, None] * pnz
        t2 = (pt * log_qt).sum(1) + n0_p * _EPS * log_eps
    # sum p~ log p~ over the non-zero bins strictly inside the slice, p~ = h - e1p: a Taylor series
    # in e1p from prefix sums when e1p is small against every count (always for integer counts),
    # else dense
    nzh = h != 0
    hs = torch.where(nzh, h, torch.ones_like(h))
    terms = torch.stack([torch.where(nzh, t, torch.zeros_like(h)) for t in
                         (h * torch.log(hs), torch.log(hs) + 1, 1 / hs, hs ** -2, hs ** -3)])
    P = torch.cat([torch.zeros(5, 1, dtype=f64, device=dev), terms.cumsum(1)], dim=1)
    inner = P[:, last] - P[:, start + 1]  # bins start+1 .. last-1
    t1 = inner[0] - e1p * inner[1] + e1p ** 2 / 2 * inner[2] + e1p ** 3 / 6 * inner[3] + e1p ** 4 / 12 * inner[4]
    hmin = h[nzh].min() if bool(nzh.any()) else torch.ones((), dtype=f64, device=dev)
    dense = e1p > 0.25 * hmin
    if bool(dense.any()):
        rows = torch.nonzero(dense).flatten()
        k = torch.arange(b, device=dev)
        inside = (k > start[rows, None]) & (k < last[rows, None]) & nzh
        v = (h - e1p[rows, None]).clamp_min(1e-300)
        t1[rows] = torch.where(inside, v * torch.log(v), torch.zeros((), dtype=f64, device=dev)).sum(1)
    for end, extra in ((start, left), (last, right)):
        pe = h[end] + extra
        ve = (pe - e1p).clamp_min(1e-300)
        t1 += torch.where(pe != 0, ve * torch.log(ve), torch.zeros_like(ve))
    t1 += n0_p * _EPS * log_eps
    kl = (t1 - t2) / total - torch.log(total) + torch.log(s_q)
    bad = (nnz_p == 0) | (nnz_q == 0) | (s_q <= 0) | ~torch.isfinite(kl)
    return torch.where(bad, torch.full_like(kl, float("inf")), kl)


def entropy_threshold(hist: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, quantized_bins: int,
                      variant: str = "onnxruntime") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping range ``(lo', hi')`` minimising the KL divergence.

    Args:
        hist: ``[rows, B]`` counts on ``B`` equal bins of ``[-M, M]`` per row (``M`` = max|x|).
        lo, hi: per-row finite min and max (the threshold is clipped to them, as ONNX Runtime does).
        quantized_bins: ``Q``, the number of grid steps (255 for an 8-bit grid).

    If ``Q >= B`` there is no candidate and the full range ``[lo, hi]`` is returned; so it is for
    constant rows (``lo == hi``).
    """
    rows, b = hist.shape
    if variant not in SIGNED_VARIANTS:
        raise ValueError(f"variant must be one of {SIGNED_VARIANTS} here (for 'tensorrt' use "
                         f"lowbit.ops.entropy_trt.tensorrt_threshold), got {variant!r}")
    if quantized_bins < 2:
        raise ValueError(f"quantized_bins must be >= 2, got {quantized_bins}")
    if quantized_bins >= b:
        return lo.clone(), hi.clone()
    m = torch.maximum(lo.abs(), hi.abs()).to(torch.float64)
    width = 2 * m / b
    best = torch.empty(rows, dtype=torch.int64, device=hist.device)
    for r in range(rows):  # a [candidates, bins] tensor per row; rows are few for activations
        kl = kl_curve_fast(hist[r], quantized_bins, variant)
        if variant == "onnxruntime":  # ORT keeps each divergence in float32; ties go to the first
            kl = kl.to(torch.float32)
        best[r] = int(torch.nonzero(kl == kl.min())[0, 0]) + quantized_bins // 2
    new_lo = torch.maximum(-best * width, lo.to(torch.float64)).to(lo.dtype)
    new_hi = torch.minimum(torch.clamp(best + 1, max=b // 2) * width, hi.to(torch.float64)).to(hi.dtype)
    constant = lo == hi  # nothing to trade off: keep the value (range_to_qparams makes it exact)
    return torch.where(constant, lo, new_lo), torch.where(constant, hi, new_hi)
