"""One-shot calibration range methods for :func:`lowbit.ops.choose_qparams`.

Each is ``fn(rows, spec, **options) -> (lo, hi)`` per row (rows as from
:func:`lowbit.ops.params.to_rows`; non-finite values are ignored) and is registered by name, so
``choose_qparams(x, spec, observer=name)`` is the one-batch form of the streaming observer of
the same name in :mod:`lowbit.observers`:

* ``"percentile"`` (``p=99.99``): symmetric grids clip at the ``p``-th percentile of ``|x|``;
  affine grids cut ``(100 - p) / 2`` percent from each end (ONNX Runtime's convention); exact
  (linear interpolation between order statistics, as ``numpy.percentile``).
* ``"mse"``: the scale minimising the squared error; exact global minimum for rows small enough
  (``rows * elements * steps <= exact_limit``), else the chunked grid search of
  :mod:`lowbit.ops.mse_search` (memory bounded by the chunk, not by the tensor); for the formats
  of :mod:`lowbit.formats` a search scored with the format's exact rounding
  (:func:`lowbit.ops.table.mse_range`).
* ``"entropy"`` (``bins=2048``, ``quantized_bins=None``, ``variant="tensorrt"``): the KL
  threshold. ``"tensorrt"`` (:mod:`lowbit.ops.entropy_trt`): ``bins`` bins of ``|x|`` on
  ``[0, max|x|]``, ``Q`` from the grid (:func:`~lowbit.ops.entropy_trt.tensorrt_quantized_bins`)
  unless given. ``"onnxruntime"`` / ``"mxnet"`` (:mod:`lowbit.ops.entropy`): ``bins`` bins on
  ``[-max|x|, max|x|]``, ``Q = 2^bits - 1`` unless given.
* ``"moving_average"``: on one tensor the moving average is its first value, i.e. min/max.
"""
from __future__ import annotations

import torch

from ..spec import QuantSpec
from .entropy import ENTROPY_VARIANTS, entropy_threshold
from .entropy_trt import tensorrt_quantized_bins, tensorrt_threshold
from . import table
from .histogram import span_of, check_bins, histogram_between, histogram_rows, row_minmax, span_exponent
from .mse import grid_limits, mse_scale_exact, mse_scale_histogram, scale_to_range
from .mse_search import mse_scale_search
from .qparams import finite_minmax, minmax_range, register_range_method

__all__ = ["percentile_range", "mse_range", "entropy_range", "check_percentile", "quantized_bins_for",
           "mse_from_histogram", "check_variant", "clip_to_threshold", "tensorrt_bins_for"]


def check_percentile(p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be a number in (0, 100], got {type(p).__name__}")
    if not 0 < p <= 100:
        raise ValueError(f"p must be a percentile in (0, 100] (e.g. 99.99), got {p}")
    return float(p)


def _row_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile of the finite values (linear interpolation); NaN marks missing values."""
    v = torch.where(torch.isfinite(values), values, torch.full_like(values, float("nan")))
    srt = v.sort(dim=1).values  # NaN sorts last
    n = torch.isfinite(srt).sum(dim=1)
    pos = (q * (n - 1).clamp_min(0)).to(torch.float64)
    k = pos.floor().to(torch.int64)
    frac = (pos - k).to(srt.dtype)
    a = srt.gather(1, k[:, None]).squeeze(1)
    b = srt.gather(1, torch.minimum(k + 1, (n - 1).clamp_min(0))[:, None]).squeeze(1)
    out = a + frac * (b - a)
    return torch.where(n > 0, out, torch.zeros_like(out))


def percentile_range(rows: torch.Tensor, spec: QuantSpec, p: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    p = check_percentile(p)
    lo, hi = finite_minmax(rows)
    if spec.symmetric:
        r = _row_quantile(rows.abs(), p / 100.0)
        return torch.maximum(-r, lo.clamp(max=0)), torch.minimum(r, hi.clamp(min=0))
    cut = (100.0 - p) / 200.0
    return _row_quantile(rows, cut), _row_quantile(rows, 1.0 - cut)


def mse_from_histogram(counts: torch.Tensor, exponent: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                       spec: QuantSpec, candidates: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE range from a span-``2^e`` histogram (see :mod:`lowbit.ops.histogram`)."""
    if not spec.number_format.integer_grid:  # FP8, NF4, MX: score bin centres with the format's rounding
        bins = counts.shape[1]
        span = span_of(exponent).to(torch.float64)[:, None]
        centres = -span + (torch.arange(bins, dtype=torch.float64, device=counts.device) + 0.5) * (2 * span / bins)
        return table.mse_range(centres, counts, lo, hi, spec, candidates)
    s_full, z, pos, neg = grid_limits(lo, hi, spec)
    s = mse_scale_histogram(counts, exponent, s_full, pos, neg, candidates)
    return _finish(s, z, lo, hi, spec)


def _finish(s, z, lo, hi, spec):
    new_lo, new_hi = scale_to_range(s, z, spec)
    keep = ~(torch.isfinite(s) & (s > 0)) | (lo == hi)  # constant or empty rows: the min/max rule
    out_lo = torch.where(keep, lo.to(torch.float64), new_lo).to(lo.dtype)
    out_hi = torch.where(keep, hi.to(torch.float64), new_hi).to(hi.dtype)
    return out_lo, out_hi


def mse_range(rows: torch.Tensor, spec: QuantSpec, bins: int = 2048, candidates: int = 20,
              exact_limit: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact optimum for small tensors; else the bounded-memory search of
    :mod:`lowbit.ops.mse_search` (``candidates`` clipping ratios ``i / candidates``, then two
    zooms and a Lloyd step, all scored by their exact error). ``bins`` is the streaming
    :class:`~lowbit.observers.MSE` observer's option, accepted (and validated) here for symmetry;
    the one-shot search needs no histogram."""
    check_bins(bins)
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be an int >= 1 (clipping ratios i/candidates, e.g. 20), got {candidates!r}")
    lo, hi, all_finite = row_minmax(rows)
    if not spec.number_format.integer_grid and rows.numel() * candidates <= exact_limit * 4:
        finite = torch.isfinite(rows)
        return table.mse_range(rows, finite.to(rows.dtype), lo, hi, spec, candidates)
    if not spec.number_format.integer_grid:
        maxabs = torch.maximum(lo.abs(), hi.abs())
        exponent = span_exponent(maxabs)
        return mse_from_histogram(histogram_rows(rows, exponent, bins, all_finite), exponent, lo, hi, spec, candidates)
    s_full, z, pos, neg = grid_limits(lo, hi, spec)
    steps = int(torch.maximum(pos, neg).max()) if rows.numel() else 0
    if rows.numel() * max(steps, 1) <= exact_limit:
        s = mse_scale_exact(rows, z, pos, neg)
    else:
        s = mse_scale_search(rows, s_full, pos, neg, candidates)
    return _finish(s, z, lo, hi, spec)


def quantized_bins_for(spec: QuantSpec, quantized_bins: int | None) -> int:
    if quantized_bins is None:
        return (1 << spec.bits) - 1
    if isinstance(quantized_bins, bool) or not isinstance(quantized_bins, int) or quantized_bins < 2:
        raise ValueError(f"quantized_bins must be an int >= 2 (e.g. 255 for 8 bits), got {quantized_bins!r}")
    return quantized_bins


def check_variant(variant: object) -> str:
    if variant not in ENTROPY_VARIANTS:
        raise ValueError(f"variant must be one of {ENTROPY_VARIANTS}, got {variant!r}")
    return variant


def clip_to_threshold(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[max(lo, -t), min(hi, t)]``; constant rows keep their value."""
    new_lo = torch.maximum(-t, lo.to(torch.float64)).to(lo.dtype)
    new_hi = torch.minimum(t, hi.to(torch.float64)).to(hi.dtype)
    constant = lo == hi
    return torch.where(constant, lo, new_lo), torch.where(constant, hi, new_hi)


def tensorrt_bins_for(spec: QuantSpec, quantized_bins: int | None, lo: torch.Tensor, hi: torch.Tensor):
    if quantized_bins is None:
        return tensorrt_quantized_bins(spec, lo, hi)
    return quantized_bins_for(spec, quantized_bins)


def entropy_range(rows: torch.Tensor, spec: QuantSpec, bins: int = 2048, quantized_bins: int | None = None,
                  variant: str = "tensorrt") -> tuple[torch.Tensor, torch.Tensor]:
    check_bins(bins)
    check_variant(variant)
    if quantized_bins is not None:
        quantized_bins_for(spec, quantized_bins)
    lo, hi = finite_minmax(rows)
    m = torch.maximum(lo.abs(), hi.abs())
    if variant == "tensorrt":   # TensorRT: torch.histc(|x|, bins, 0, max|x|)
        counts = histogram_between(rows.abs(), torch.zeros_like(m), m, bins)
        t = tensorrt_threshold(counts, m.to(torch.float64) / bins, tensorrt_bins_for(spec, quantized_bins, lo, hi))
        return clip_to_threshold(t, lo, hi)
    counts = histogram_between(rows, -m, m, bins)
    return entropy_threshold(counts, lo, hi, quantized_bins_for(spec, quantized_bins), variant)


register_range_method("percentile", percentile_range)
register_range_method("mse", mse_range)
register_range_method("entropy", entropy_range)
register_range_method("moving_average", minmax_range)
