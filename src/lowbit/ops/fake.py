"""Fake quantization with a straight-through estimator (STE).

Forward: ``dequantize(quantize(x))`` computed in floating point (NaN propagates like any float op),
bit-identical to ONNX Runtime's QuantizeLinear -> DequantizeLinear. With ``v = round(x/s) + z``
and ``q = clamp(v, qmin, qmax)`` the output is ``(q - z) * s``; ``x`` *saturated* where ``v != q``.

Backward (Bengio et al. 2013, "Estimating or propagating gradients through stochastic neurons"):
rounding has zero gradient almost everywhere, so the STE treats it as the identity:

* ``ste="identity"``: ``dL/dx = dL/dy`` everywhere (the gradient is passed through, not copied);
* ``ste="clipped"``:  ``dL/dx = dL/dy * 1[x not saturated]`` (0 where it saturated; the
  forward keeps a 1-byte mask for this).

If ``scale`` requires grad, the output is also differentiable in the scale with the LSQ gradient
(Esser et al. 2020, "Learned Step Size Quantization"), with ``x/s`` unrounded::

    dy/ds = round(x/s) - x/s      where x was not saturated
          = q - z                 where it saturated (qmin - z or qmax - z)

summed over the elements that share a scale (the gradient scaling factor of LSQ belongs to the
caller, which knows the tensor size). The zero point gets no gradient (it is an integer).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..spec import QuantSpec
from . import kernels, table
from .grid import _check_input, _check_spec, grid_operands, prepare_qparams, round_to_grid

__all__ = ["fake_quantize", "STE_MODES"]

STE_MODES = ("identity", "clipped")


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax, rounding, generator, clipped):
        learn = ctx.needs_input_grad[1]
        qz = None
        if rounding == "nearest":
            y, inside = kernels.fake_quantize(x, s, z, qmin, qmax, want_mask=clipped or learn)
        else:
            v = round_to_grid(x.to(s.dtype) / s, rounding, generator) + z
            q = torch.clamp(v, qmin, qmax)
            inside = v == q
            qz = q - z
            y = qz * s
        ctx.clipped, ctx.learn, ctx.bounds = clipped, learn, (qmin, qmax)
        ctx.set_materialize_grads(False)
        if learn:
            ctx.save_for_backward(x, s, z, inside, qz)
        elif clipped:
            ctx.save_for_backward(inside)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 8
        if ctx.learn:
            x, s, z, inside, qz = ctx.saved_tensors
        elif ctx.clipped:
            (inside,) = ctx.saved_tensors
        gx = gs = None
        if ctx.needs_input_grad[0]:
            gx = kernels.mask_grad(grad, inside) if ctx.clipped else grad
        if ctx.learn:
            v = x.to(s.dtype) / s
            if qz is None:  # nearest rounding is deterministic: recompute instead of storing
                qz = torch.clamp(torch.round(v) + z, *ctx.bounds) - z
            slope = qz - torch.where(inside.bool(), v, torch.zeros((), dtype=v.dtype, device=v.device))
            gs = (grad.to(s.dtype) * slope).sum_to_size(s.shape)
        return gx, gs, None, None, None, None, None, None


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale, zero_point, ste: str = "identity",
                  generator: torch.Generator | None = None, validate: bool = True) -> torch.Tensor:
    """``dequantize(quantize(x))`` in one float op, differentiable by the straight-through estimator.

    Args:
        ste: ``"identity"`` or ``"clipped"`` (zero gradient where ``x`` saturated).
        generator: for ``spec.rounding == "stochastic"``, a seeded ``torch.Generator``.
        validate: check the values of ``scale``/``zero_point`` (a host synchronisation); callers
            that checked them when they were set pass False.

    Returns a tensor of ``x``'s dtype. See the module docstring for the gradients.
    """
    _check_input(x)
    if ste not in STE_MODES:
        raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}")
    _check_spec(spec)
    if not spec.number_format.integer_grid:  # FP8, NF4, MX: STE through the format's rounding
        return table.fake_quantize(x, spec, scale, zero_point, ste, generator, validate)
    if spec.rounding == "stochastic":
        s, z = prepare_qparams(x, spec, scale, zero_point)  # draws one random number per element of x
        xv, finish = x, None
    else:
        xv, s, z, finish = grid_operands(x, spec, scale, zero_point, validate=validate)
    learn = isinstance(scale, torch.Tensor) and scale.requires_grad and torch.is_grad_enabled()
    if not learn:
        s = s.detach()
    y = _FakeQuantize.apply(xv, s, z.detach(), spec.qmin, spec.qmax, spec.rounding, generator,
                            ste == "clipped")
    return y if finish is None else finish(y)
