"""ONNX translations of the :mod:`lowbit.export.torch_ops` operators (``onnxscript``).

Each function receives the traced op's tensors as ONNX values and its integer arguments as Python
values, and emits the nodes described in :mod:`lowbit.export.torch_ops`.

Dynamic activations (``spec.dynamic``) are written as the computation of their grid followed by
``QuantizeLinear -> DequantizeLinear``, not as ``DynamicQuantizeLinear``: that operator exists only
per tensor and unsigned 8-bit, and fits a constant tensor differently; the formulas below are those
of :func:`lowbit.ops.range_to_qparams` (``lo, hi`` = min and max of each token or of the tensor)::

    symmetric:  r = max(|lo|, |hi|);  s = r / (qmax - z0)  (r / 2^k for a constant row; 1 if r = 0);  z = z0
    affine:     lo <- min(lo, 0), hi <- max(hi, 0);  s = (hi - lo) / (qmax - qmin)  (1 if hi = lo);
                z = clip(qmin - round(lo / s), qmin, qmax)

so ONNX Runtime fits the same grid as lowbit to the last bit (the same float32 operations). The
codes come from a blocked ``QuantizeLinear`` (``axis=-1``, one block per token); per token, the
dequantization is written as ``(Cast(q) - z) * s`` (the arithmetic of ``DequantizeLinear``), because
ONNX Runtime 1.32 fuses ``DequantizeLinear -> MatMul`` into ``MatMulIntegerToFloat``, which fails at
run time on a per-token zero point.
"""
from __future__ import annotations

import torch
from onnx import TensorProto

from ..spec import QuantSpec

__all__ = ["translation_table", "container_onnx_type"]

_TINY = float(torch.finfo(torch.float32).tiny)


def container_onnx_type(bits: int, signed: bool) -> int:
    """ONNX element type that holds a code of ``bits`` (8- or 16-bit container; 4-bit for weights is
    applied after tracing)."""
    if bits <= 8:
        return TensorProto.INT8 if signed else TensorProto.UINT8
    return TensorProto.INT16 if signed else TensorProto.UINT16


def _container_range(bits: int, signed: bool) -> tuple[int, int]:
    if bits <= 8:
        return (-128, 127) if signed else (0, 255)
    return (-(1 << 15), (1 << 15) - 1) if signed else (0, (1 << 16) - 1)


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def translation_table(opset: int) -> dict:
    """``{torch op overload: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``."""
    import onnxscript

    op = getattr(onnxscript, f"opset{opset}")

    def qdq_kwargs(axis: int, block_size: int) -> dict:
        kw = {"axis": axis}
        if block_size > 0:
            kw["block_size"] = block_size
        return kw

    def quantize_dequantize(x, scale, zero_point, axis: int, block_size: int, qmin: int, qmax: int, clip: bool):
        kw = qdq_kwargs(axis, block_size)
        q = op.QuantizeLinear(x, scale, zero_point, **kw)
        if clip:  # a grid narrower than its 8/16-bit container (narrow_range, 2..7 bits)
            q = op.Clip(q, op.CastLike(op.Constant(value_int=qmin), zero_point),
                        op.CastLike(op.Constant(value_int=qmax), zero_point))
        return op.DequantizeLinear(q, scale, zero_point, **kw)

    def dynamic_grid(x, spec: QuantSpec, per_token: bool):
        """``(scale, zero_point)`` of ``x``: ``lowbit.ops.range_to_qparams`` of its min and max."""
        qmin, qmax = spec.qmin, spec.qmax
        zero_type = container_onnx_type(spec.bits, spec.signed)

        def const(v: float):
            return op.CastLike(op.Constant(value_float=float(v)), x)

        if per_token:
            axes = op.Constant(value_ints=[-1])
            lo, hi = op.ReduceMin(x, axes, keepdims=1), op.ReduceMax(x, axes, keepdims=1)
        else:
            lo, hi = op.ReduceMin(x, keepdims=0), op.ReduceMax(x, keepdims=0)
        zero, one = const(0.0), const(1.0)
        if spec.symmetric:
            z0 = spec.symmetric_zero_point
            span = qmax - z0
            r = op.Max(op.Abs(lo), op.Abs(hi))
            positive = op.Greater(r, zero)
            constant = op.And(op.Equal(lo, hi), positive)
            scale = op.Where(constant, op.Div(r, const(_pow2_floor(span))), op.Div(r, const(span)))
            scale = op.Where(positive, op.Max(scale, const(_TINY)), one)
            zp = op.Cast(op.Add(op.Mul(scale, zero), const(z0)), to=zero_type)
        else:
            constant = op.And(op.Equal(lo, hi), op.Not(op.Equal(lo, zero)))
            lo, hi = op.Min(lo, zero), op.Max(hi, zero)
            width = op.Sub(hi, lo)
            levels = qmax - qmin
            scale = op.Where(constant, op.Div(width, const(_pow2_floor(levels))), op.Div(width, const(levels)))
            scale = op.Where(op.Greater(width, zero), op.Max(scale, const(_TINY)), one)
            zf = op.Clip(op.Sub(const(qmin), op.Round(op.Div(lo, scale))), const(qmin), const(qmax))
            zp = op.Cast(zf, to=zero_type)
        return scale, zp

    def quantize(x, scale, zp, spec: QuantSpec, kw: dict):
        q = op.QuantizeLinear(x, scale, zp, **kw)
        if (spec.qmin, spec.qmax) != _container_range(spec.bits, spec.signed):
            q = op.Clip(q, op.CastLike(op.Constant(value_int=spec.qmin), zp),
                        op.CastLike(op.Constant(value_int=spec.qmax), zp))
        return q

    def dynamic_quantize_dequantize(x, bits: int, signed: bool, symmetric: bool, narrow_range: bool,
                                    per_token: bool, features: int):
        spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range)
        scale, zp = dynamic_grid(x, spec, per_token)
        kw = qdq_kwargs(-1, features) if per_token else {}
        q = quantize(x, scale, zp, spec, kw)
        if not per_token:
            return op.DequantizeLinear(q, scale, zp)
        # per token: (q - z) * s written out; ONNX Runtime 1.32 would fuse a DequantizeLinear here into
        # MatMulIntegerToFloat, which rejects a per-token zero point at run time
        return op.Mul(op.Sub(op.CastLike(q, x), op.CastLike(zp, x)), scale)

    def integer_linear(x, weight_t, weight_zero_point, colsum, weight_scale, bias, input_scale, input_zero_point,
                       bits: int, signed: bool, symmetric: bool, narrow_range: bool, dynamic: bool, per_token: bool,
                       features: int):
        spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range)
        if dynamic:
            scale, zp = dynamic_grid(x, spec, per_token)
        else:
            scale, zp = input_scale, input_zero_point
        kw = qdq_kwargs(-1, features) if (dynamic and per_token) else {}
        shift = 128 if signed else 0
        if signed:
            # the GEMM reads uint8 (U8S8 / U8U8 are ONNX Runtime's fast int8 GEMMs on x86; S8S8 is several
            # times slower): signed codes q become q + 128 on a uint8 grid with zero point z + 128
            zp = op.Cast(op.Add(op.Cast(zp, to=TensorProto.INT32), op.Cast(op.Constant(value_int=128), to=TensorProto.INT32)),
                         to=TensorProto.UINT8)
        lo, hi = spec.qmin + shift, spec.qmax + shift
        q = op.QuantizeLinear(x, scale, zp, **kw)
        if (lo, hi) != (0, 255):
            q = op.Clip(q, op.CastLike(op.Constant(value_int=lo), zp), op.CastLike(op.Constant(value_int=hi), zp))
        if dynamic and per_token and not symmetric:
            # one zero point per token: MatMulInteger takes a scalar one, so subtract z * sum_k (W - z_w) exactly
            acc = op.MatMulInteger(q, weight_t, None, weight_zero_point)
            acc = op.Sub(acc, op.Mul(op.Cast(zp, to=TensorProto.INT32), colsum))
        else:
            if dynamic and per_token:   # symmetric: the same zero point for every token, a constant
                zp = op.Cast(op.Constant(value_int=spec.symmetric_zero_point + shift), to=TensorProto.UINT8)
            acc = op.MatMulInteger(q, weight_t, zp, weight_zero_point)          # exact int32
        # Cast -> Mul(Mul(s, s_w)) -> Add(b): ONNX Runtime fuses it into MatMulIntegerToFloat. With one
        # scale per token, ONNX Runtime 1.32's fused kernel multiplies the bias by that scale too, so the
        # bias is then subtracted as -b (exact): the fusion takes an Add only
        y = op.Mul(op.Cast(acc, to=TensorProto.FLOAT), op.Mul(scale, weight_scale))
        if bias is None:
            return y
        return op.Sub(y, op.Neg(bias)) if (dynamic and per_token) else op.Add(y, bias)

    def dequantize(codes, scale, zero_point, axis: int, block_size: int):
        return op.DequantizeLinear(codes, scale, zero_point, **qdq_kwargs(axis, block_size))

    ops = torch.ops.lowbit
    return {
        ops.quantize_dequantize.default: quantize_dequantize,
        ops.dynamic_quantize_dequantize.default: dynamic_quantize_dequantize,
        ops.dequantize.default: dequantize,
        ops.integer_linear.default: integer_linear,
    }
