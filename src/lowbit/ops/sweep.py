"""The clipping trade-off as data: quantization error as a function of the clipped range.

For a clipping ratio ``r`` the range is the max-abs (symmetric grids) or min/max (affine grids,
widened to contain 0) range scaled by ``r``, per scale row; :func:`clip_sweep` measures the error
with :func:`lowbit.ops.quant_error` for each ratio, so ``clip_mse + round_mse == mse`` at every
point. Small ratios clip the tails (``clip_mse`` grows), large ones round coarsely (``round_mse``
~ ``s^2/12`` grows): the curve is U-shaped and an observer's result lands somewhere on it
(its ratio is ``scale / full_scale``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import QuantSpec
from .error import quant_error
from .params import from_rows, to_rows
from .qparams import finite_minmax, qparams_from_range, range_to_qparams

__all__ = ["ClipSweep", "clip_sweep"]


@dataclass(frozen=True)
class ClipSweep:
    """Error per clipping ratio (1-D float64 tensors, one entry per ratio)."""

    ratios: torch.Tensor
    mse: torch.Tensor
    clip_mse: torch.Tensor
    round_mse: torch.Tensor
    clip_fraction: torch.Tensor
    sqnr_db: torch.Tensor
    full_scale: torch.Tensor  # the scale at ratio 1 (parameter shape of the spec)

    def best_ratio(self) -> float:
        """The ratio with the smallest mse."""
        return float(self.ratios[int(torch.argmin(self.mse))])

    def as_dict(self) -> dict[str, list[float]]:
        return {k: getattr(self, k).tolist() for k in
                ("ratios", "mse", "clip_mse", "round_mse", "clip_fraction", "sqnr_db")}


def clip_sweep(x: torch.Tensor, spec: QuantSpec, ratios) -> ClipSweep:
    """Quantization error of ``x`` under ``spec`` for each clipping ratio of the full range.

    Args:
        ratios: positive finite numbers (a sequence or 1-D tensor), e.g. ``torch.linspace(0.05, 1, 40)``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a lowbit.QuantSpec, got {type(spec).__name__}")
    try:
        r = torch.as_tensor(ratios, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"ratios must be a sequence of numbers or a 1-D tensor: {e}") from None
    if r.numel() == 0 or not bool(torch.isfinite(r).all()) or not bool((r > 0).all()):
        raise ValueError("ratios must be a non-empty list of positive finite numbers, e.g. torch.linspace(0.05, 1, 40)")
    if x.numel() == 0 or not bool(torch.isfinite(x).any()):
        raise ValueError("x has no finite element to sweep over")
    rows = to_rows(x.detach(), spec)
    lo, hi = finite_minmax(rows.to(torch.float64))
    if spec.symmetric:
        m = torch.maximum(lo.abs(), hi.abs())
        lo, hi = -m, m
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    full, _ = range_to_qparams(lo.to(dtype), hi.to(dtype), spec)
    results = []
    for ratio in r.tolist():
        s, z = qparams_from_range((lo * ratio).to(dtype), (hi * ratio).to(dtype), x.shape, spec)
        results.append(quant_error(x, spec, s, z))

    def col(name):
        return torch.tensor([getattr(e, name) for e in results], dtype=torch.float64)

    return ClipSweep(ratios=r, mse=col("mse"), clip_mse=col("clip_mse"), round_mse=col("round_mse"),
                     clip_fraction=col("clip_fraction"), sqnr_db=col("sqnr_db"),
                     full_scale=from_rows(full, x.shape, spec))
