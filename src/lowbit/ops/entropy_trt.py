"""TensorRT's entropy calibration (``variant="tensorrt"``, the default): a KL search on ``|x|``.

NVIDIA pytorch-quantization's ``_compute_amax_entropy`` (the calibrator of TensorRT; Migacz,
"8-bit Inference with TensorRT", GTC 2017). The histogram ``h`` of ``|x|`` has ``B`` bins of width
``w`` on ``[0, B w]``; ``Q`` is the number of quantized bins between 0 and the threshold.

1. ``h[0] = h[1]``. Bin 0 holds every exact zero (half of a ReLU output); left as it is, its
   spike dominates the divergence and the search clips ReLU outputs far too tightly.
2. Every candidate ``i = start .. B`` (threshold ``T = i w``) compares
   * ``p``: ``h[:i]`` with the clipped mass ``sum h[i:]`` added to its last bin, and
   * ``q``: bin ``k < i`` belongs to chunk ``floor(k Q / i)``; each chunk's mass is spread evenly
     over its non-empty bins (empty bins stay 0),

   by ``KL(p / |p| || q / |q|)`` (``scipy.stats.entropy``; ``+inf`` where ``p > 0 = q``).
3. The threshold is the *last* minimiser.

No loop over candidates: with ``P = sum p`` (all the mass), ``|q| = sum h[:i]`` and ``m_c``,
``n_c`` the mass and the non-empty bins of chunk ``c``::

    KL = (sum_k p_k log p_k - sum_c m_c log(m_c / n_c) - o log q_{i-1}) / P - log P + log |q|

where ``o = sum h[i:]`` is the clipped mass; every sum is read from prefix sums of ``h``,
``h log h`` and ``[h > 0]``.

**How many quantized bins.** TensorRT uses ``Q = 2^(b-1)`` (signed) or ``2^b`` (unsigned).
:func:`tensorrt_quantized_bins` takes ``Q`` from the grid the range really gets: the number of
grid points from zero to the end of the dominant side once the grid is fitted to ``[min, max]``.
A signed symmetric grid gives ``2^(b-1)`` (TensorRT's value); an affine grid on one-sided data
(a ReLU output) puts all ``2^b`` levels on ``[0, T]``; two-sided data on an affine grid gets its
share. (ONNX Runtime's variant, :mod:`lowbit.ops.entropy`, compares ``2^b - 1`` bins over the
signed range, i.e. ~128 over a one-sided ``[0, T]``, and clips ReLU outputs at ~1/8 of their max.)
"""
from __future__ import annotations

import torch

from ..spec import QuantSpec
from .qparams import range_to_qparams

__all__ = ["kl_curve_tensorrt", "tensorrt_threshold", "tensorrt_quantized_bins", "START_BIN"]

START_BIN = 128          # TensorRT's first candidate (of 2048 bins)
_BLOCK = 1 << 22         # candidates x chunks per block of work


def tensorrt_quantized_bins(spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per row, the grid points from zero to the far end of ``[lo, hi]`` once ``spec``'s grid is
    fitted to it: ``floor(max(|lo|, |hi|) / scale) + 1``."""
    lo64, hi64 = lo.to(torch.float64), hi.to(torch.float64)
    scale, _ = range_to_qparams(lo64, hi64, spec)
    steps = torch.floor(torch.maximum(lo64.abs(), hi64.abs()) / scale + 1e-6).to(torch.int64)
    return (steps + 1).clamp_min(2)


def kl_curve_tensorrt(abs_hist: torch.Tensor, quantized_bins: int, start_bin: int = START_BIN) -> torch.Tensor:
    """TensorRT's divergence of every candidate ``i = start_bin .. B`` for one histogram of ``|x|``.

    ``abs_hist [B]`` is taken as it is (apply ``h[0] = h[1]`` first, as :func:`tensorrt_threshold`
    does). Returns float64 of length ``B - start_bin + 1``, ``inf`` where undefined.
    """
    h = abs_hist.to(torch.float64)
    b, qn, dev = h.numel(), int(quantized_bins), h.device
    f64 = torch.float64
    start = max(1, min(int(start_bin), b))
    i = torch.arange(start, b + 1, device=dev)
    zero = torch.zeros(1, dtype=f64, device=dev)
    H = torch.cat([zero, h.cumsum(0)])
    NZ = torch.cat([zero, (h > 0).to(f64).cumsum(0)])
    hs = torch.where(h > 0, h, torch.ones_like(h))
    HLH = torch.cat([zero, (h * torch.log(hs)).cumsum(0)])
    total = H[-1]
    inside = H[i]                      # |q| = mass of h[:i]
    out = total - inside               # clipped mass, added to p's last bin
    last = h[i - 1]
    p_last = last + out
    plogp = HLH[i - 1] + torch.where(p_last > 0, p_last * torch.log(p_last.clamp_min(1e-300)), torch.zeros_like(p_last))
    # chunk c of candidate i covers bins [ceil(c i / Q), ceil((c + 1) i / Q))
    mlogq = torch.empty_like(inside)
    qlast = torch.empty_like(inside)
    rows = max(1, _BLOCK // (qn + 1))
    c = torch.arange(qn + 1, device=dev)
    for s in range(0, i.numel(), rows):
        ib = i[s:s + rows]
        bounds = (c[None, :] * ib[:, None] + qn - 1) // qn
        mass = H[bounds[:, 1:]] - H[bounds[:, :-1]]
        nz = NZ[bounds[:, 1:]] - NZ[bounds[:, :-1]]
        mlogq[s:s + rows] = torch.where(nz > 0, mass * torch.log(mass.clamp_min(1e-300) / nz.clamp_min(1)),
                                        torch.zeros_like(mass)).sum(1)
        c_last = ((ib - 1) * qn) // ib    # the chunk of bin i - 1
        m_l, n_l = mass.gather(1, c_last[:, None])[:, 0], nz.gather(1, c_last[:, None])[:, 0]
        qlast[s:s + rows] = torch.where(n_l > 0, m_l / n_l.clamp_min(1), torch.zeros_like(m_l))
    plogq = mlogq + torch.where(out > 0, out * torch.log(qlast.clamp_min(1e-300)), torch.zeros_like(out))
    kl = (plogp - plogq) / total - torch.log(total) + torch.log(inside)
    bad = (total <= 0) | (inside <= 0) | ((out > 0) & (last <= 0)) | ~torch.isfinite(kl)
    return torch.where(bad, torch.full_like(kl, float("inf")), kl)


def tensorrt_threshold(abs_hist: torch.Tensor, width: torch.Tensor, quantized_bins: torch.Tensor | int,
                       start_bin: int | torch.Tensor = START_BIN) -> torch.Tensor:
    """Per-row threshold ``T = i* w`` (float64) minimising TensorRT's divergence.

    Args:
        abs_hist: ``[rows, B]`` counts of ``|x|`` on bins of width ``width`` (per row) from 0.
        quantized_bins: ``Q`` per row (a tensor) or for all rows (an int).
        start_bin: the first candidate (TensorRT: 128 of 2048), per row or for all.

    Rows without mass, or where no candidate is finite, get ``T = B w`` (no clipping).
    """
    rows, b = abs_hist.shape
    qn = torch.as_tensor(quantized_bins).expand(rows)
    st = torch.as_tensor(start_bin).expand(rows)
    best = torch.full((rows,), b, dtype=torch.int64)
    for r in range(rows):   # rows are few for activations (per-tensor ranges)
        h = abs_hist[r].to(torch.float64).clone()
        if b > 1:
            h[0] = h[1]     # tame the spike of exact zeros (TensorRT)
        if float(h.sum()) <= 0:
            continue
        s = int(st[r])
        kl = kl_curve_tensorrt(h, int(qn[r]), s)
        finite = torch.isfinite(kl)
        if bool(finite.any()):
            best[r] = int(torch.nonzero(kl == kl[finite].min()).flatten()[-1]) + max(1, min(s, b))
    return best.to(width.device, torch.float64) * width.to(torch.float64)
