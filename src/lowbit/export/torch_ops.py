"""The three torch operators an exported quantized layer is traced with (namespace ``lowbit``).

``torch.onnx.export`` traces the model; each quantized layer calls these operators, and
:mod:`lowbit.export.translate` maps each to its ONNX nodes one for one, so the QDQ structure is
written exactly where the quantized layers are (no pattern matching on the traced graph):

* ``lowbit::quantize_dequantize(x, scale, zero_point, axis, block_size, qmin, qmax, clip)``
  -> ``QuantizeLinear -> [Clip] -> DequantizeLinear``;
* ``lowbit::dynamic_quantize_dequantize(x, bits, signed, symmetric, narrow_range, per_token, features)``
  -> the range, scale and zero point computed from ``x`` (ReduceMin/ReduceMax/Div/Round/Where,
  the formulas of :func:`lowbit.ops.range_to_qparams`) -> ``QuantizeLinear -> DequantizeLinear``
  (per token: blocked, ``axis=-1``, ``block_size=features``);
* ``lowbit::dequantize(codes, scale, zero_point, axis, block_size)`` -> ``DequantizeLinear``;
* ``lowbit::integer_linear(x, W^T codes, z_w, ...)`` (``export_onnx(..., integer=True)``): the input's
  codes from ``QuantizeLinear`` (grid as above) -> ``MatMulInteger`` with the weight codes (``int8``,
  or ``uint8`` ``w + 128`` with ``z_w = 128``: :mod:`lowbit.integer.cpu`) -> exact int32
  ``acc = sum_k (q - z)(W - z_w)`` -> ``acc * (s * s_w) + b``.

Parameters follow ONNX (opset 21): a scalar scale (per tensor), a 1-D scale along ``axis`` (per
channel), or a scale of the input's rank with ``shape[axis] = ceil(n / block_size)`` (blocked).
The eager implementations compute the same thing in torch
(``q = clamp(round_half_even(x / s) + z, qmin, qmax)``, ``x^ = (q - z) * s``), so a traced
copy runs like the lowbit model it came from.
"""
# No ``from __future__ import annotations`` here: torch.library.custom_op reads these annotations
# as types, and torch < 2.5 cannot resolve them from strings.
from typing import Optional

import torch

from ..ops.qparams import range_to_qparams
from ..spec import QuantSpec

__all__ = ["expand_param", "quantize_dequantize", "dynamic_quantize_dequantize", "dequantize", "integer_linear"]


def expand_param(p: torch.Tensor, shape: torch.Size, axis: int, block_size: int) -> torch.Tensor:
    """Make an ONNX-shaped parameter broadcast against a tensor of ``shape``."""
    if p.dim() == 0:
        return p
    axis = axis % len(shape)
    if block_size > 0:
        return p.repeat_interleave(block_size, dim=axis).narrow(axis, 0, shape[axis])
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return p.reshape(view)


@torch.library.custom_op("lowbit::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                        block_size: int, qmin: int, qmax: int, clip: bool) -> torch.Tensor:
    s = expand_param(scale, x.shape, axis, block_size).to(torch.float32)
    z = expand_param(zero_point, x.shape, axis, block_size).to(torch.float32)
    q = torch.clamp(torch.round(x.to(torch.float32) / s) + z, qmin, qmax)
    return ((q - z) * s).to(x.dtype)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, axis, block_size, qmin, qmax, clip):
    return torch.empty_like(x)


@torch.library.custom_op("lowbit::dynamic_quantize_dequantize", mutates_args=())
def dynamic_quantize_dequantize(x: torch.Tensor, bits: int, signed: bool, symmetric: bool, narrow_range: bool,
                                per_token: bool, features: int) -> torch.Tensor:
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range)
    xf = x.to(torch.float32)
    rows = xf.reshape(-1, xf.shape[-1]) if per_token else xf.reshape(1, -1)
    scale, zp = range_to_qparams(rows.amin(dim=1), rows.amax(dim=1), spec)
    shape = (*xf.shape[:-1], 1) if per_token else ()
    s, z = scale.reshape(shape), zp.reshape(shape).to(torch.float32)
    q = torch.clamp(torch.round(xf / s) + z, spec.qmin, spec.qmax)
    return ((q - z) * s).to(x.dtype)


@dynamic_quantize_dequantize.register_fake
def _(x, bits, signed, symmetric, narrow_range, per_token, features):
    return torch.empty_like(x)


@torch.library.custom_op("lowbit::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
               block_size: int) -> torch.Tensor:
    s = expand_param(scale, codes.shape, axis, block_size)
    z = expand_param(zero_point, codes.shape, axis, block_size)
    return (codes.to(torch.int32) - z.to(torch.int32)).to(torch.float32) * s


@dequantize.register_fake
def _(codes, scale, zero_point, axis, block_size):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("lowbit::integer_linear", mutates_args=())
def integer_linear(x: torch.Tensor, weight_t: torch.Tensor, weight_zero_point: torch.Tensor, colsum: torch.Tensor,
                   weight_scale: torch.Tensor,
                   bias: Optional[torch.Tensor], input_scale: torch.Tensor, input_zero_point: torch.Tensor, bits: int,
                   signed: bool, symmetric: bool, narrow_range: bool, dynamic: bool, per_token: bool,
                   features: int) -> torch.Tensor:
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range)
    xf = x.to(torch.float32)
    if dynamic:
        rows = xf.reshape(-1, xf.shape[-1]) if per_token else xf.reshape(1, -1)
        s, z = range_to_qparams(rows.amin(dim=1), rows.amax(dim=1), spec)
        shape = (*xf.shape[:-1], 1) if per_token else ()
        s, z = s.reshape(shape), z.reshape(shape)
    else:
        s, z = input_scale, input_zero_point.to(torch.int32)
    q = torch.clamp(torch.round(xf / s) + z, spec.qmin, spec.qmax)
    w = weight_t.to(torch.float64) - weight_zero_point.to(torch.float64)
    acc = (q - z).to(torch.float64) @ w                                    # exact below 2^53
    y = (acc * s * weight_scale).to(torch.float32)
    return (y if bias is None else y + bias).to(x.dtype)


@integer_linear.register_fake
def _(x, weight_t, weight_zero_point, colsum, weight_scale, bias, input_scale, input_zero_point, bits, signed, symmetric, narrow_range,
      dynamic, per_token, features):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))
