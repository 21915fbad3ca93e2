"""Quantize, dequantize, fake-quantize and measure the error for the value-table formats.

Every format of :mod:`lowbit.formats` other than ``"int"`` (FP8, NF4, MX, NVFP4) is a finite
table of element values; with ``v = x / s`` (``s`` broadcast by the granularity, zero point 0)::

    codes = F.encode(v)            x^ = F.decode(codes) * s   = F.round(v) * s

``F.round`` is round-to-nearest (ties to the even code) or stochastic between the two
neighbours, saturating at the table's ends. ``x`` *saturated* (clipped) where ``v`` lies beyond
the table (``F.saturated``). The straight-through estimator and the LSQ scale gradient are
those of :mod:`lowbit.ops.fake` with the format's rounding in place of ``round``::

    dy/dx = 1 (or 1[not saturated]),      dy/ds = F.round(v) - v 1[not saturated]

:mod:`lowbit.ops.grid` and friends dispatch here when ``spec.number_format.integer_grid`` is
False; nothing here names a format.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["quantize", "dequantize", "fake_quantize", "quant_error_parts", "round_values"]


def _nan_check(v: torch.Tensor, fmt) -> None:
    if not fmt.has_nan and bool(torch.isnan(v).any()):
        raise ValueError(f"x contains NaN, which format {fmt.name!r} cannot represent; clean the input "
                         "(torch.nan_to_num) or use ops.fake_quantize, which propagates NaN")


def quantize(x, spec, scale, zero_point, generator=None):
    from .grid import grid_operands

    fmt = spec.number_format
    xv, s, _, finish = grid_operands(x, spec, scale, zero_point)
    v = xv.to(s.dtype) / s
    _nan_check(v, fmt)
    return finish(fmt.encode(v, spec.rounding, generator).to(spec.storage_dtype))


def dequantize(q, spec, scale_t, zero_point, dtype, validate=True):
    from .grid import grid_operands

    qv, s, _, finish = grid_operands(q, spec, scale_t, zero_point, dtype=dtype, validate=validate)
    return finish(spec.number_format.decode(qv, dtype) * s)


def round_values(v: torch.Tensor, spec, generator=None) -> torch.Tensor:
    """``F.round(v)`` with NaN kept (fake quantization propagates NaN like any float op)."""
    r = spec.number_format.round(v, spec.rounding, generator)
    return torch.where(torch.isnan(v), v, r)


class _FakeTable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, spec, generator, clipped):
        learn = ctx.needs_input_grad[1]
        v = x.to(s.dtype) / s
        r = round_values(v, spec, generator)
        ctx.clipped, ctx.learn, ctx.s_shape = clipped, learn, s.shape
        ctx.set_materialize_grads(False)
        inside = ~spec.number_format.saturated(v) if (clipped or learn) else None
        if learn:
            ctx.save_for_backward(v, r, inside)
        elif clipped:
            ctx.save_for_backward(inside)
        return (r * s).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 5
        if ctx.learn:
            v, r, inside = ctx.saved_tensors
        elif ctx.clipped:
            (inside,) = ctx.saved_tensors
        gx = gs = None
        if ctx.needs_input_grad[0]:
            gx = grad * inside.to(grad.dtype) if ctx.clipped else grad
        if ctx.learn:
            slope = r - torch.where(inside, v, torch.zeros((), dtype=v.dtype, device=v.device))
            gs = (grad.to(v.dtype) * slope).sum_to_size(ctx.s_shape)
        return gx, gs, None, None, None


def fake_quantize(x, spec, scale, zero_point, ste, generator, validate):
    from .grid import grid_operands

    xv, s, _, finish = grid_operands(x, spec, scale, zero_point, validate=validate)
    learn = isinstance(scale, torch.Tensor) and scale.requires_grad and torch.is_grad_enabled()
    if not learn:
        s = s.detach()
    return finish(_FakeTable.apply(xv, s, spec, generator, ste == "clipped"))


def quant_error_parts(x, spec, scale, zero_point, generator=None):
    """``(x^, saturated)`` shaped like ``x``: what :func:`lowbit.ops.quant_error` measures."""
    from .grid import grid_operands

    xv, s, _, finish = grid_operands(x, spec, scale, zero_point)
    v = xv.to(s.dtype) / s
    r = round_values(v, spec, generator)
    return finish((r * s).to(x.dtype)), finish(spec.number_format.saturated(v))


def mse_range(points: torch.Tensor, weights: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec,
              candidates: int = 32, rounds: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE-optimal symmetric range per row for a value-table format, by search.

    ``points [rows, n]`` with ``weights`` (1 per value for a one-shot search, bin masses for a
    histogram; non-finite points must have weight 0). Candidate ranges ``R = a max(|lo|, |hi|)``,
    ``a`` in ``(0, 1]`` (``candidates`` points, then ``rounds - 1`` zooms of 17 points, each 8x
    finer), each mapped to its scale by the format's own rule (``scale_for_range``: absmax or E8M0)
    and scored with the format's exact rounding: ``sum w (p - F.round(p / s) s)^2``.
    Returns ``(-R*, R*)`` (the full range for empty rows).
    """
    fmt = spec.number_format
    p = torch.where(weights > 0, points, torch.zeros((), dtype=points.dtype, device=points.device)).to(torch.float64)
    w = weights.to(torch.float64)
    r_full = torch.maximum(lo.abs(), hi.abs()).to(torch.float64)
    rows = p.shape[0]
    dev = p.device
    a_best = torch.ones(rows, dtype=torch.float64, device=dev)

    def score(a: torch.Tensor) -> torch.Tensor:  # a [rows, C] -> error [rows, C]
        out = torch.empty_like(a)
        for c in range(a.shape[1]):
            s = fmt.scale_for_range(a[:, c] * r_full)[:, None]
            s = torch.where(s > 0, s, torch.ones_like(s))
            out[:, c] = (w * (p - fmt.round(p / s) * s).square()).sum(dim=1)
        return out

    a = (torch.arange(1, candidates + 1, dtype=torch.float64, device=dev) / candidates).expand(rows, -1)
    step = 1.0 / candidates
    offsets = torch.linspace(-1.0, 1.0, 17, dtype=torch.float64, device=dev)
    for round_ in range(rounds):
        err = score(a)
        a_best = a.gather(1, err.argmin(dim=1, keepdim=True)).squeeze(1)
        if round_ == rounds - 1:
            break
        a = (a_best[:, None] + offsets * step).clamp(1e-6, 1.0)
        step /= 8
    r = (a_best * r_full).to(lo.dtype)
    keep = r_full == 0
    return torch.where(keep, lo, -r), torch.where(keep, hi, r)
