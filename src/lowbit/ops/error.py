"""Quantization error and its two sources: saturation (clipping) and rounding.

With ``x^ = fake_quantize(x)`` and ``N`` elements, an element *saturates* when
``round(x/s) + z`` falls outside ``[qmin, qmax]``. The squared error splits exactly::

    mse       = sum((x - x^)^2) / N
    clip_mse  = sum over saturated elements / N
    round_mse = sum over the others / N            (clip_mse + round_mse == mse)

and ``sqnr_db = 10 log10(sum x^2 / sum (x - x^)^2)``. A wide range has no clip error but a coarse
step (round_mse ~ s^2/12 per element); a narrow one rounds finely but clips the tails.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..spec import QuantSpec
from .grid import _check_input, prepare_qparams, round_to_grid

__all__ = ["QuantError", "quant_error"]


@dataclass(frozen=True)
class QuantError:
    """Error of quantizing one tensor; see :mod:`lowbit.ops.error`."""

    mse: float
    clip_mse: float
    round_mse: float
    clip_fraction: float
    sqnr_db: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def quant_error(x: torch.Tensor, spec: QuantSpec, scale, zero_point,
                generator: torch.Generator | None = None) -> QuantError:
    """Measure the error of quantizing ``x`` with ``(scale, zero_point)``; non-finite elements are skipped."""
    _check_input(x)
    s, z = prepare_qparams(x, spec, scale, zero_point)
    x64 = x.detach().to(torch.float64)
    s64, z64 = s.to(torch.float64), z.to(torch.float64)
    v = round_to_grid(x64 / s64, spec.rounding, generator) + z64
    q = torch.clamp(v, spec.qmin, spec.qmax)
    err2 = ((q - z64) * s64 - x64).square()
    finite = torch.isfinite(x64)
    n = int(finite.sum())
    if n == 0:
        raise ValueError("x has no finite element to measure an error on")
    clipped = (v != q) & finite
    err2 = torch.where(finite, err2, torch.zeros_like(err2))
    total = float(err2.sum())
    clip = float(err2[clipped].sum())
    signal = float(torch.where(finite, x64, torch.zeros_like(x64)).square().sum())
    if total == 0.0:
        sqnr = math.inf
    elif signal == 0.0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / total)
    return QuantError(mse=total / n, clip_mse=clip / n, round_mse=(total - clip) / n,
                      clip_fraction=float(clipped.sum()) / n, sqnr_db=sqnr)
