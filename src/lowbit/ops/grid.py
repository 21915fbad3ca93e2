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

from ..spec import PerGroup, PerTensor, QuantSpec
from . import kernels, table
from .params import as_param, broadcast_param, check_qparams

__all__ = ["quantize", "dequantize", "stochastic_round", "round_to_grid", "prepare_qparams", "grid_operands"]


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``floor(x) + Bernoulli(x - floor(x))``: unbiased, ``E[result] = x``, always floor or ceil.

    A seeded ``torch.Generator`` (on ``x``'s device) makes the result reproducible.
    Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015.
    """
    floor = torch.floor(x)
    u_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # fine-grained u
    u = torch.rand(x.shape, generator=generator, dtype=u_dtype, device=x.device)
    return floor + (u < (x - floor).to(u_dtype)).to(x.dtype)


def round_to_grid(v: torch.Tensor, rounding: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round ``v`` (already divided by the scale) with the spec's rounding mode."""
    if rounding == "nearest":
        return torch.round(v)  # half to even, as ONNX
    return stochastic_round(v, generator)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _validated(x_shape: torch.Size, device: torch.device, spec: QuantSpec, scale, zero_point,
               dtype: torch.dtype, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a lowbit.QuantSpec, got {type(spec).__name__}")
    scale = as_param(scale, "scale", dtype, device)
    zero_point = as_param(zero_point, "zero_point", torch.int32, device)
    check_qparams(x_shape, spec, scale, zero_point, values=validate)
    return scale, zero_point


def prepare_qparams(x: torch.Tensor, spec: QuantSpec, scale, zero_point) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``scale``/``zero_point`` for ``x`` and return them broadcastable against ``x``
    (scale in the compute dtype, zero point as float so that ``round(x/s) + z`` stays float).

    PerGroup parameters are expanded to ``x``'s shape; :func:`grid_operands` avoids that copy.
    """
    dtype = _compute_dtype(x)
    scale, zero_point = _validated(x.shape, x.device, spec, scale, zero_point, dtype)
    s = broadcast_param(scale, x.shape, spec).to(device=x.device, dtype=dtype)
    z = broadcast_param(zero_point, x.shape, spec).to(device=x.device, dtype=dtype)
    return s, z


def _identity(r: torch.Tensor) -> torch.Tensor:
    return r


def grid_operands(x: torch.Tensor, spec: QuantSpec, scale, zero_point, z_dtype: torch.dtype | None = None,
                  dtype: torch.dtype | None = None, validate: bool = True):
    """Validate the parameters and lay ``x`` out so that they broadcast without being expanded.

    Returns ``(xv, s, z, finish)``: ``xv`` is ``x`` flattened (PerTensor), as is (PerChannel,
    PerToken), or viewed ``[..., groups, size, ...]`` (PerGroup; a partial last group is padded
    with zeros); ``s`` (in ``dtype``, default the compute dtype of ``x``) and ``z`` (in
    ``z_dtype``, default ``s``'s dtype) broadcast against ``xv``; ``finish(r)`` turns a result
    shaped like ``xv`` back into ``x``'s shape. Differentiable in ``x`` and ``scale``.
    """
    dtype = dtype or _compute_dtype(x)
    scale, zero_point = _validated(x.shape, x.device, spec, scale, zero_point, dtype, validate)
    scale = scale.to(device=x.device, dtype=dtype)
    zero_point = zero_point.to(device=x.device, dtype=z_dtype or dtype)
    g = spec.granularity
    shape = x.shape
    if isinstance(g, PerTensor):
        return x.reshape(-1), scale.reshape(()), zero_point.reshape(()), lambda r: r.reshape(shape)
    if not isinstance(g, PerGroup):  # PerChannel, PerToken: broadcast_param only reshapes
        return x, broadcast_param(scale, shape, spec), broadcast_param(zero_point, shape, spec), _identity
    axis = g.axis % x.dim()
    n, size = shape[axis], g.size
    groups = -(-n // size)
    pad = groups * size - n
    if pad:
        widths = [0, 0] * (x.dim() - 1 - axis) + [0, pad]
        x = torch.nn.functional.pad(x, widths)
    view = (*shape[:axis], groups, size, *shape[axis + 1:])
    pview = (*shape[:axis], groups, 1, *shape[axis + 1:])
    padded = (*shape[:axis], groups * size, *shape[axis + 1:])

    def finish(r: torch.Tensor) -> torch.Tensor:
        r = r.reshape(padded)
        return r.narrow(axis, 0, n).contiguous() if pad else r

    return x.reshape(view), scale.reshape(pview), zero_point.reshape(pview), finish


def _check_spec(spec: object) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a lowbit.QuantSpec, got {type(spec).__name__}")


def _check_input(x: object, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


_NAN_MESSAGE = ("x contains NaN, which no integer can represent; clean the input "
                "(torch.nan_to_num) or use ops.fake_quantize, which propagates NaN")


def quantize(x: torch.Tensor, spec: QuantSpec, scale, zero_point,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Map ``x`` onto the integer grid of ``spec``; returns a tensor of ``spec.storage_dtype``.

    For a non-``"int"`` format the codes are the format's (:mod:`lowbit.ops.table`).

    Raises ``ValueError`` if ``x`` holds NaN (no integer can represent it); ``±inf`` saturates.
    Large tensors run a fused compiled kernel (:mod:`lowbit.ops.kernels`), bit-identical to eager.
    """
    _check_input(x)
    _check_spec(spec)
    x = x.detach()
    if not spec.number_format.integer_grid:  # a value-table format (FP8, NF4, MX): lowbit.ops.table
        return table.quantize(x, spec, scale, zero_point, generator)
    if spec.rounding == "stochastic":
        s, z = prepare_qparams(x, spec, scale, zero_point)
        if bool(torch.isnan(x).any()):
            raise ValueError(_NAN_MESSAGE)
        v = round_to_grid(x.to(s.dtype) / s, spec.rounding, generator) + z
        return torch.clamp(v, spec.qmin, spec.qmax).to(spec.storage_dtype)
    xv, s, z, finish = grid_operands(x, spec, scale, zero_point)
    q, has_nan = kernels.quantize(xv, s, z, spec.qmin, spec.qmax, spec.storage_dtype)
    if has_nan:
        raise ValueError(_NAN_MESSAGE)
    return finish(q)


def dequantize(q: torch.Tensor, spec: QuantSpec, scale, zero_point, validate: bool = True) -> torch.Tensor:
    """``(q - zero_point) * scale`` in the scale's dtype (float32 for a Python number).

    The product is computed in float32 (float64 for a float64 scale) and rounded once to the
    scale's dtype, as ONNX Runtime does for float16 scales. ``validate=False`` skips the checks of
    the qparams' values (for callers that checked them once, e.g. :class:`lowbit.QTensor`).
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer tensor (from ops.quantize), got {q.dtype}")
    scale_t = as_param(scale, "scale", torch.float32, q.device)
    out_dtype = scale_t.dtype if scale_t.is_floating_point() else torch.float32
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    _check_spec(spec)
    if not spec.number_format.integer_grid:
        return table.dequantize(q, spec, scale_t, zero_point, dtype, validate).to(out_dtype)
    qv, s, z, finish = grid_operands(q, spec, scale_t, zero_point, dtype=dtype, validate=validate)
    if scale_t.requires_grad and torch.is_grad_enabled():  # differentiable in the scale
        y = (qv.to(dtype) - z) * s                          # q - z is exact in float
    else:
        y = kernels.dequantize(qv, s, z)
    return finish(y).to(out_dtype)
