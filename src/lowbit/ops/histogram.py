"""Per-row histograms of a tensor, kept on a grid that streams and merges exactly.

Each row (one row per scale, see :func:`lowbit.ops.params.to_rows`) has ``B`` equal bins over a
symmetric span ``[-T, T]`` (bin ``k`` holds ``-T + k w <= x < -T + (k+1) w``, ``w = 2T/B``;
``x = T`` goes into the last bin). The span is a power of two, ``T = 2^ceil(log2 max|x|)``, and
``B`` is a power of two (>= 4), so:

* binning is exact in floating point: ``k = floor(x * B/(2T)) + B/2`` multiplies by a power of two;
* when a batch exceeds the span, ``T`` doubles and pairs of bins merge into one
  (:func:`grow_histogram`), which loses no count and keeps memory constant;
* the histogram is a function of the multiset of values seen: streaming in any order, one pass
  over the concatenation, and merging per-process histograms (after growing them to the common
  span) all give the same counts.

A row that has only seen zeros has ``T = 0`` and all its counts in bin ``B/2`` (which contains 0
on every span). The cost of the power-of-two span is resolution: ``max|x|`` covers between
half and all of the bins, so callers that want ``n`` bins over ``[-max|x|, max|x|]`` keep
``2n`` and :func:`resample_histogram` onto the exact span (assuming uniform density in a bin).

Percentiles from a histogram interpolate linearly inside the bin that crosses the target mass.
"""
from __future__ import annotations

import torch

__all__ = [
    "span_exponent",
    "histogram_rows",
    "grow_histogram",
    "resample_histogram",
    "fold_histogram",
    "histogram_quantile",
    "check_bins",
    "histogram_between",
    "row_minmax",
]


def check_bins(bins: object, name: str = "bins") -> int:
    """Validate a bin count: an int power of two >= 4."""
    if isinstance(bins, bool) or not isinstance(bins, int):
        raise TypeError(f"{name} must be an int, got {type(bins).__name__}")
    if bins < 4 or bins & (bins - 1):
        raise ValueError(f"{name} must be a power of two >= 4 (e.g. 2048), got {bins}")
    return bins


def span_exponent(maxabs: torch.Tensor) -> torch.Tensor:
    """``e`` with ``2^(e-1) < maxabs <= 2^e`` per row (int64); rows with ``maxabs == 0`` give a
    sentinel ``-2**62`` meaning "empty span" (``T = 0``)."""
    m = maxabs.to(torch.float64)
    mant, ex = torch.frexp(m)  # m = mant * 2^ex, mant in [0.5, 1)
    e = ex.to(torch.int64) - (mant == 0.5).to(torch.int64)
    return torch.where(m > 0, e, torch.full_like(e, -(2 ** 62)))


def span_of(exponent: torch.Tensor) -> torch.Tensor:
    """``T = 2^e`` (float64), 0 for the empty sentinel."""
    empty = exponent < -(2 ** 61)
    t = torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent.clamp_min(-1074))
    return torch.where(empty, torch.zeros_like(t), t)


def grow_histogram(counts: torch.Tensor, exponent: torch.Tensor, new_exponent: torch.Tensor) -> torch.Tensor:
    """Re-bin ``counts [rows, B]`` from span ``2^exponent`` to the wider ``2^new_exponent``.

    Each doubling merges bins ``(2j, 2j+1)`` into bin ``B/4 + j``; the outer quarters start
    empty. Rows going from the empty span keep their counts (all in bin ``B/2``).
    """
    rows, b = counts.shape
    empty = exponent < -(2 ** 61)
    steps = torch.where(empty, torch.zeros_like(exponent), (new_exponent - exponent).clamp_min(0))
    out = counts
    remaining = steps.clone()
    while bool((remaining > 0).any()):
        doubled = torch.zeros_like(out)
        doubled[:, b // 4: 3 * b // 4] = out.reshape(rows, b // 2, 2).sum(dim=-1)
        active = (remaining > 0).unsqueeze(1)
        out = torch.where(active, doubled, out)
        remaining = remaining - 1
    return out


def row_minmax(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per-row finite ``(min, max)`` (``(0, 0)`` for rows without a finite value) and whether every
    value was finite (then a single ``aminmax`` pass suffices)."""
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)  # (amin/amax beat aminmax(dim) by 10x on CPU)
    # under torch.compile a data-dependent branch breaks the graph: take the masked path always
    if not torch.compiler.is_compiling() and bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all()):
        return lo, hi, True
    finite = torch.isfinite(rows)
    lo = torch.where(finite, rows, torch.inf).amin(dim=1)
    hi = torch.where(finite, rows, -torch.inf).amax(dim=1)
    empty = ~finite.any(dim=1)
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0), False


def histogram_rows(rows: torch.Tensor, exponent: torch.Tensor, bins: int, all_finite: bool | None = None) -> torch.Tensor:
    """Counts ``[rows, bins]`` (int64) of the finite values of ``rows`` on spans ``2^exponent``.

    Every finite value must lie inside its row's span (grow the span first).
    """
    r = rows.shape[0]
    x = rows if rows.dtype == torch.float64 else rows.to(torch.float32)
    t = span_of(exponent)
    inv_w = torch.where(t > 0, bins / (2 * t).clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(t))
    if all_finite is None:
        all_finite = bool(torch.isfinite(x).all())
    offsets = torch.arange(r, device=x.device, dtype=torch.int64).unsqueeze(1) * bins + bins // 2
    v = x * inv_w.to(x.dtype).unsqueeze(1)  # exact: a power of two (or 0 for empty spans)
    if all_finite:
        v = v.floor_().clamp_(-(bins // 2), bins // 2 - 1)
        if r * bins < (1 << 24):  # integers stay exact in float32; int32 halves the traffic
            flat = v.add_(offsets.to(v.dtype)).to(torch.int32)
        else:
            flat = v.to(torch.int64).add_(offsets)
    else:
        finite = torch.isfinite(x)
        v = torch.where(finite, v, torch.zeros_like(v)).floor_().clamp_(-(bins // 2), bins // 2 - 1)
        flat = torch.where(finite, v.to(torch.int64) + offsets, torch.full_like(offsets, r * bins))
    return torch.bincount(flat.reshape(-1), minlength=r * bins + 1)[: r * bins].reshape(r, bins)


def resample_histogram(counts: torch.Tensor, span: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                       bins: int) -> torch.Tensor:
    """Counts over ``bins`` equal bins of ``[lo, hi]`` per row (float64), from ``counts`` on
    ``[-span, span]``, assuming a uniform density inside each source bin.

    Mass outside ``[lo, hi]`` is dropped, so pass ``lo <= min`` and ``hi >= max`` to keep it all.
    Rows with ``span == 0`` put all their mass in the bin that contains 0.
    """
    rows, b = counts.shape
    c = counts.to(torch.float64)
    cum = torch.cat([torch.zeros(rows, 1, dtype=c.dtype, device=c.device), c.cumsum(dim=1)], dim=1)
    frac = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=c.device)
    lo64, hi64, t = lo.to(torch.float64), hi.to(torch.float64), span.to(torch.float64)
    edges = lo64.unsqueeze(1) + (hi64 - lo64).unsqueeze(1) * frac
    safe_t = torch.where(t > 0, t, torch.ones_like(t)).unsqueeze(1)
    pos = ((edges + safe_t) / (2 * safe_t) * b).clamp(0, b)
    k = pos.floor().to(torch.int64).clamp(max=b - 1)
    cdf = cum.gather(1, k) + (pos - k) * c.gather(1, k)
    out = cdf.diff(dim=1)
    zero_rows = t <= 0
    if bool(zero_rows.any()):
        width = (hi64 - lo64).clamp_min(torch.finfo(torch.float64).tiny)
        zbin = ((0 - lo64) / width * bins).floor().to(torch.int64).clamp(0, bins - 1)
        z = torch.zeros_like(out).scatter_(1, zbin.unsqueeze(1), c.sum(dim=1, keepdim=True))
        out = torch.where(zero_rows.unsqueeze(1), z, out)
    return out.clamp_min(0)


def fold_histogram(counts: torch.Tensor) -> torch.Tensor:
    """Histogram of ``|x|`` over ``[0, T]`` with ``B/2`` bins from the signed one over ``[-T, T]``
    (bin ``j`` of ``|x|`` gathers signed bins ``B/2 + j`` and ``B/2 - 1 - j``; exact)."""
    b = counts.shape[1]
    return counts[:, b // 2:] + counts[:, : b // 2].flip(1)


def histogram_quantile(counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value below which a fraction ``q`` (per row or scalar, in [0, 1]) of the mass lies, for
    counts on equal bins of ``[lo, hi]``; linear inside the crossing bin."""
    rows, b = counts.shape
    c = counts.to(torch.float64)
    cum = c.cumsum(dim=1)
    total = cum[:, -1:]
    q = torch.as_tensor(q, dtype=torch.float64, device=c.device).reshape(-1, 1).expand(rows, 1)
    target = q * total
    k = torch.searchsorted(cum, target.contiguous()).clamp(max=b - 1)
    before = torch.where(k > 0, cum.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(target))
    inbin = c.gather(1, k)
    frac = torch.where(inbin > 0, (target - before) / inbin.clamp_min(1e-300), torch.zeros_like(target))
    width = ((hi.to(torch.float64) - lo.to(torch.float64)) / b).unsqueeze(1)
    return (lo.to(torch.float64).unsqueeze(1) + (k + frac.clamp(0, 1)) * width).squeeze(1)


def histogram_between(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts ``[rows, bins]`` (int64) of the finite values on ``bins`` equal bins of ``[lo, hi]``
    per row (as ``numpy.histogram(x, bins, range=(lo, hi))``: the last bin includes ``hi``).
    Values outside the range are dropped."""
    r = rows.shape[0]
    x = rows.to(torch.float64)
    lo64, hi64 = lo.to(torch.float64)[:, None], hi.to(torch.float64)[:, None]
    width = hi64 - lo64
    scale = torch.where(width > 0, bins / width.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(width))
    keep = torch.isfinite(x) & (x >= lo64) & (x <= hi64)
    idx = torch.floor((torch.where(keep, x, lo64) - lo64) * scale).to(torch.int64).clamp_(0, bins - 1)
    offsets = torch.arange(r, device=x.device, dtype=torch.int64).unsqueeze(1) * bins
    flat = torch.where(keep, idx + offsets, torch.full_like(idx, r * bins))
    return torch.bincount(flat.reshape(-1), minlength=r * bins + 1)[: r * bins].reshape(r, bins)
