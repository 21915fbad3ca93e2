"""Fake quantization with a straight-through estimator (STE).

Forward: ``dequantize(quantize(x))`` computed in floating point (NaN propagates like any float op).
Backward (Bengio et al. 2013, "Estimating or propagating gradients through stochastic neurons"):
rounding has zero gradient almost everywhere, so the STE treats it as the identity:

* ``ste="identity"``: ``dL/dx = dL/dy`` everywhere;
* ``ste="clipped"``:  ``dL/dx = dL/dy`` where ``x`` fell inside the grid, 0 where it saturated.

If ``scale`` requires grad, the output is also differentiable in the scale with the LSQ gradient
(Esser et al. 2020, "Learned Step Size Quantization"), with ``v = x/s``::

    dy/ds = round(v) - v          inside the grid
          = qmin - z  or  qmax - z  where x saturated

(the gradient scaling factor of LSQ belongs to the caller, which knows the tensor size).
"""
from __future__ import annotations

import torch

from ..spec import QuantSpec
from .grid import _check_input, prepare_qparams, round_to_grid

__all__ = ["fake_quantize", "STE_MODES"]

STE_MODES = ("identity", "clipped")


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax, rounding, generator, clipped):
        xf = x.to(s.dtype)
        v = round_to_grid(xf / s, rounding, generator) + z
        q = torch.clamp(v, qmin, qmax)
        if clipped:
            ctx.save_for_backward(v == q)
        ctx.clipped = clipped
        ctx.in_dtype = x.dtype
        return ((q - z) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clipped:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad.to(ctx.in_dtype), None, None, None, None, None, None, None


def _fake_quantize_learnable(x, s, z, spec: QuantSpec, generator, clipped: bool) -> torch.Tensor:
    xf = x.to(s.dtype)
    v = xf / s
    r = v + (round_to_grid(v.detach(), spec.rounding, generator) - v).detach()  # STE round
    q = torch.clamp(r + z, spec.qmin, spec.qmax)
    y = (q - z) * s
    if not clipped:  # pass dL/dx through where the clamp cut it
        outside = ((r + z) != q).detach()
        y = y + (xf - xf.detach()) * outside
    return y.to(x.dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale, zero_point, ste: str = "identity",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` in one float op, differentiable by the straight-through estimator.

    Args:
        ste: ``"identity"`` or ``"clipped"`` (zero gradient where ``x`` saturated).
        generator: for ``spec.rounding == "stochastic"``, a seeded ``torch.Generator``.
    """
    _check_input(x)
    if ste not in STE_MODES:
        raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}")
    s, z = prepare_qparams(x, spec, scale, zero_point)
    clipped = ste == "clipped"
    if isinstance(scale, torch.Tensor) and scale.requires_grad and torch.is_grad_enabled():
        return _fake_quantize_learnable(x, s, z, spec, generator, clipped)
    return _FakeQuantizeSTE.apply(x, s.detach(), z, spec.qmin, spec.qmax, spec.rounding, generator, clipped)
