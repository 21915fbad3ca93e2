"""The integer grid: quantize, dequantize and rounding.

Semantics are exactly those of ONNX ``QuantizeLinear`` / ``DequantizeLinear``::

    q  = saturate(round(x / scale) + zero_point)        # true division; zero point added after rounding
    x^ = (q - zero_point) * scale

``round`` is round-half-to-even for ``rounding="nearest"`` and :func:`stochastic_round` for
``rounding="stochastic"``; ``saturate`` clamps to ``[spec.qmin, spec.qmax]`` (so ``±inf`` maps to
the end codes). Scale and zero-point shapes are described in :mod:`lowbit.ops.params`.
"""
from __future__ import annotations

import torch

from ..spec import QuantSpec
from .params import as_param, broadcast_param, check_qparams

__all__ = ["quantize", "dequantize", "stochastic_round", "round_to_grid", "prepare_qparams"]


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``floor(x) + Bernoulli(x - floor(x))``: unbiased, ``E[result] = x``, always floor or ceil.

    A seeded ``torch.Generator`` (on ``x``'s device) makes the result reproducible.
    Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015.
    """
    floor = torch.floor(x)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return floor + (u < (x - floor)).to(x.dtype)


def round_to_grid(v: torch.Tensor, rounding: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round ``v`` (already divided by the scale) with the spec's rounding mode."""
    if rounding == "nearest":
        return torch.round(v)  # half to even, as ONNX
    return stochastic_round(v, generator)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def prepare_qparams(x: torch.Tensor, spec: QuantSpec, scale, zero_point) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``scale``/``zero_point`` for ``x`` and return them broadcastable against ``x``
    (scale in the compute dtype, zero point as float so that ``round(x/s) + z`` stays float)."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a lowbit.QuantSpec, got {type(spec).__name__}")
    dtype = _compute_dtype(x)
    scale = as_param(scale, "scale", dtype, x.device)
    zero_point = as_param(zero_point, "zero_point", torch.int32, x.device)
    check_qparams(x.shape, spec, scale, zero_point)
    s = broadcast_param(scale, x.shape, spec).to(dtype)
    z = broadcast_param(zero_point, x.shape, spec).to(dtype)
    return s, z


def _check_input(x: object, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def quantize(x: torch.Tensor, spec: QuantSpec, scale, zero_point,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Map ``x`` onto the integer grid of ``spec``; returns a tensor of ``spec.storage_dtype``.

    Raises ``ValueError`` if ``x`` holds NaN (no integer can represent it); ``±inf`` saturates.
    """
    _check_input(x)
    s, z = prepare_qparams(x, spec, scale, zero_point)
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN, which no integer can represent; clean the input "
                         "(torch.nan_to_num) or use ops.fake_quantize, which propagates NaN")
    xf = x.to(s.dtype)
    q = torch.clamp(round_to_grid(xf / s, spec.rounding, generator) + z, spec.qmin, spec.qmax)
    return q.to(spec.storage_dtype)


def dequantize(q: torch.Tensor, spec: QuantSpec, scale, zero_point) -> torch.Tensor:
    """``(q - zero_point) * scale``, in the scale's dtype (float32 by default)."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex():
        raise TypeError(f"q must be an integer tensor (from ops.quantize), got {q.dtype}")
    scale = as_param(scale, "scale", torch.float32, q.device)
    zero_point = as_param(zero_point, "zero_point", torch.int32, q.device)
    check_qparams(q.shape, spec, scale, zero_point)
    s = broadcast_param(scale, q.shape, spec)
    z = broadcast_param(zero_point, q.shape, spec)
    return (q.to(torch.int32) - z.to(torch.int32)).to(s.dtype) * s
