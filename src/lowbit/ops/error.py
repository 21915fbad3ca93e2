"""Quantization error and its two sources: saturation (clipping) and rounding.

With ``x^ = fake_quantize(x)`` and ``N`` elements, an element *saturates* when
``round(x/s) + z`` falls outside ``[qmin, qmax]`` (for the formats of :mod:`lowbit.formats`:
where ``x/s`` lies beyond the format's largest value). The squared error splits exactly::

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
from . import table
from .grid import _check_input, _check_spec, grid_operands, prepare_qparams, round_to_grid

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


def _grid_parts(x, spec, scale, zero_point, generator):
    if spec.rounding == "stochastic":
        s, z = prepare_qparams(x, spec, scale, zero_point)
        xv, finish = x, (lambda r: r)
    else:
        xv, s, z, finish = grid_operands(x, spec, scale, zero_point)
    v = round_to_grid(xv.to(s.dtype) / s, spec.rounding, generator) + z
    q = torch.clamp(v, spec.qmin, spec.qmax)
    return finish(((q - z) * s).to(x.dtype)), finish(v != q)


def quant_error(x: torch.Tensor, spec: QuantSpec, scale, zero_point,
                generator: torch.Generator | None = None) -> QuantError:
    """Measure the error of quantizing ``x`` with ``(scale, zero_point)``; non-finite elements are skipped.

    ``x^`` is exactly what :func:`lowbit.ops.fake_quantize` returns (same arithmetic, same dtype);
    the sums are accumulated in float64.
    """
    _check_input(x)
    x = x.detach()
    _check_spec(spec)
    if not spec.number_format.integer_grid:  # clip = beyond the format's largest value
        x_hat, saturated = table.quant_error_parts(x, spec, scale, zero_point, generator)
    else:
        x_hat, saturated = _grid_parts(x, spec, scale, zero_point, generator)
    finite = torch.isfinite(x)
    n = int(finite.sum())
    if n == 0:
        raise ValueError("x has no finite element to measure an error on")
    x64 = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)).to(torch.float64)
    err2 = (x_hat.to(torch.float64) - x64).square().masked_fill_(~finite, 0.0)
    clipped = saturated & finite
    total = float(err2.sum())
    clip = float(err2[clipped].sum())
    signal = float(x64.square().sum())
    if total == 0.0:
        sqnr = math.inf
    elif signal == 0.0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / total)
    return QuantError(mse=total / n, clip_mse=clip / n, round_mse=(total - clip) / n,
                      clip_fraction=float(clipped.sum()) / n, sqnr_db=sqnr)
