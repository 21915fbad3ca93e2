"""From a real range to ``(scale, zero_point)``, and the one-shot range estimators.

A *range method* maps the rows of a tensor (see :func:`lowbit.ops.params.to_rows`; one row per
scale) to a real interval ``[lo, hi]`` per row. :func:`range_to_qparams` then fits the grid:

* symmetric: ``R = max(|lo|, |hi|)``, ``scale = R / (qmax - z0)``, ``zero_point = z0``
  (``z0 = 0`` for signed grids, ``2^(b-1)`` for unsigned), so ``R`` maps to ``qmax`` and nothing
  inside ``[-R, R]`` saturates;
* affine: the range is widened to contain 0 (so 0 is exact, as ONNX Runtime and torch do),
  ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = clamp(qmin - round(lo / scale))``.

Degenerate rows get a valid positive scale: an all-zero row gets ``scale = 1``; a constant row
``c`` gets ``scale = |c| / 2^k`` (the largest power of two that fits the grid; ``|c|`` itself if
that would lose bits), which makes the round trip exact in floating point. ``choose_qparams``
gives a constant row this grid whichever observer it uses. Non-finite values are ignored by every range method.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..spec import QuantSpec
from .histogram import row_minmax
from .params import from_rows, to_rows

__all__ = ["choose_qparams", "range_to_qparams", "qparams_from_range", "finite_minmax", "RANGE_METHODS", "register_range_method"]


def finite_minmax(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min and max over finite values; rows without any finite value give ``(0, 0)``."""
    finite = torch.isfinite(rows)
    lo = torch.where(finite, rows, torch.inf).amin(dim=1)
    hi = torch.where(finite, rows, -torch.inf).amax(dim=1)
    empty = ~finite.any(dim=1)
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def minmax_range(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``[min(x), max(x)]``."""
    return finite_minmax(rows)


def maxabs_range(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``[-max|x|, max|x|]``."""
    lo, hi = finite_minmax(rows)
    r = torch.maximum(lo.abs(), hi.abs())
    return -r, r


RangeMethod = Callable[..., tuple[torch.Tensor, torch.Tensor]]
RANGE_METHODS: dict[str, RangeMethod] = {"minmax": minmax_range, "maxabs": maxabs_range}


def register_range_method(name: str, fn: RangeMethod) -> None:
    """Make ``fn(rows, spec, **options) -> (lo, hi)`` available as ``choose_qparams(observer=name)``."""
    RANGE_METHODS[name] = fn


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def range_to_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit the grid of ``spec`` to per-row ranges ``[lo, hi]``; see the module docstring.

    A non-``"int"`` format maps ``R = max(|lo|, |hi|)`` with its own rule
    (:meth:`lowbit.formats.NumberFormat.scale_for_range`: ``R / max_value``, or the E8M0 rule of MX).

    Returns ``(scale, zero_point)`` as 1-D float32 (float64 if ``lo`` is) and int32 tensors.
    """
    dtype = torch.float64 if lo.dtype == torch.float64 else torch.float32
    lo, hi = lo.to(dtype), hi.to(dtype)
    tiny = torch.finfo(dtype).tiny
    fmt = spec.number_format
    if not fmt.integer_grid:  # the format's rule for [-R, R] (absmax / E8M0), zero point 0
        scale = fmt.scale_for_range(torch.maximum(lo.abs(), hi.abs()))
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    if spec.symmetric:
        z0 = spec.symmetric_zero_point
        r = torch.maximum(lo.abs(), hi.abs())
        scale = _fit(r, spec.qmax - z0, (lo == hi) & (r > 0), tiny)
        return scale, torch.full_like(scale, z0, dtype=torch.int32)
    constant = (lo == hi) & (lo != 0)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    levels = spec.qmax - spec.qmin
    width = hi - lo
    scale = _fit(width, levels, constant, tiny)
    overflow = torch.isinf(width)  # hi - lo beyond the float range: divide first
    scale = torch.where(overflow, hi / levels - lo / levels, scale)
    zero_point = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax)
    return scale, zero_point.to(torch.int32)


def _fit(width: torch.Tensor, steps: int, constant: torch.Tensor, tiny: float) -> torch.Tensor:
    """``width / steps``; 1 for an empty range; for a constant row the exact ``|c| / 2^k``."""
    scale = (width / steps).clamp_min(tiny)
    p = _pow2_floor(steps)
    exact = width / p
    exact = torch.where(exact * p == width, exact, width)  # |c| / 2^k unless it lost bits (subnormal)
    scale = torch.where(constant, exact, scale)
    return torch.where(width > 0, scale, torch.ones_like(scale))


def choose_qparams(x: torch.Tensor, spec: QuantSpec, observer: str = "minmax", **options) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` for ``x`` under ``spec``, shaped as ONNX expects for the granularity.

    ``observer`` names the range method (``"minmax"``, ``"maxabs"``, and the calibration methods
    of :mod:`lowbit.observers`); ``options`` go to it.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a lowbit.QuantSpec, got {type(spec).__name__}")
    if observer not in RANGE_METHODS:
        raise ValueError(f"observer must be one of {sorted(RANGE_METHODS)}, got {observer!r}")
    if x.numel() == 0:
        raise ValueError("x is empty: there is no range to measure")
    rows = to_rows(x.detach(), spec)
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()
    lo, hi = RANGE_METHODS[observer](rows, spec, **options)
    c_lo, c_hi, _ = row_minmax(rows)   # no full-size temporaries when every value is finite
    constant = c_lo == c_hi  # whatever the observer says, a constant row gets its exact grid
    lo, hi = torch.where(constant, c_lo.to(lo.dtype), lo), torch.where(constant, c_hi.to(hi.dtype), hi)
    return qparams_from_range(lo, hi, x.shape, spec)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, shape, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`range_to_qparams` shaped for a tensor of ``shape``, with the format's last step on
    the whole set of scales (:meth:`~lowbit.formats.NumberFormat.finish_scales`: double
    quantization of NF4 scales, FP8 block scales of NVFP4; the identity otherwise)."""
    scale, zero_point = range_to_qparams(lo, hi, spec)
    scale = spec.number_format.finish_scales(from_rows(scale, shape, spec), spec)
    return scale, from_rows(zero_point, shape, spec)
