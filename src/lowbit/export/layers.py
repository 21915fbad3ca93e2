"""The traceable stand-in of each frozen quantized layer, laid out as its ONNX graph will be.

``export_layer(name, layer)`` turns a frozen :class:`lowbit.modules.QuantLayer` into a module that
computes the same function with the :mod:`lowbit.export.torch_ops` operators:

* input: ``QuantizeLinear -> DequantizeLinear`` with the calibrated grid (static), or with the grid
  computed from the tensor (dynamic, per tensor or per token); nothing if the layer is weight-only;
* weight: the integer codes as an initializer -> ``DequantizeLinear``, laid out as the layer class
  says (:meth:`lowbit.modules.QuantLayer.onnx_weight`): a Linear stores ``W^T`` (``[in, out]``, the
  ``B`` of ``MatMul``; ONNX Runtime fuses ``DequantizeLinear(int4, axis=0, block_size) -> MatMul``
  into ``MatMulNBits``); a convolution stores its kernel ``[out, in, k...]`` when the scales are per
  tensor or per output channel, else its GEMM view ``[out, in*k]`` (groups of ``in*k``) followed by
  a ``Reshape``;
* the layer's float operation (:meth:`lowbit.modules.QuantLayer.functional`): ``MatMul`` (+ ``Add``
  bias), ``Conv``, ...

With ``integer=True`` a Linear with int8-able grids is instead one ``lowbit::integer_linear``
(``QuantizeLinear -> MatMulInteger -> scale``, see :mod:`lowbit.export.torch_ops`): the form ONNX
Runtime runs with its int8 GEMM.

8-bit signed weight codes of a layer with 8-bit activations are written in the integer format
that :func:`lowbit.integer.cpu.choose_format` picks (:attr:`ExportLayer.int8_format`): ``"u8s8"``
(``int8`` codes, as calibrated) or ``"u8u8"`` (``uint8`` codes ``w + 128`` with zero point
``z_w + 128``: the same real weights, which ONNX Runtime multiplies with its U8U8 kernels, exact
on CPUs without VNNI, where its U8S8 kernels saturate in int16).

A frozen :class:`lowbit.modules.QuantEmbedding` becomes :class:`ExportEmbedding`: its codes as
an initializer -> ``DequantizeLinear`` (``axis=0`` per row, blocked along ``axis=1`` per row group)
-> ``Gather`` by the token ids.

Codes of 2..4 bits are traced as 8-bit and written as ONNX INT4/UINT4 afterwards
(:attr:`ExportLayer.int4`), 5..8 bits as INT8/UINT8, 9..16 bits as INT16/UINT16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..integer.cpu import choose_format, u8_activation_range
from ..integer.fast import fast_reason
from ..modules import QuantEmbedding, QuantLayer
from ..spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from .torch_ops import dequantize, dynamic_quantize_dequantize, quantize_dequantize  # noqa: F401 (registers ops)

__all__ = ["ExportLayer", "export_layer", "ExportEmbedding", "export_embedding", "unsupported_reason", "Int4Initializer", "BLOCKED_OPSET"]

BLOCKED_OPSET = 21  # blocked Q/DQ and INT4/UINT4 tensors


def _container_dtype(bits: int, signed: bool) -> torch.dtype:
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    return torch.int16 if signed else torch.uint16


def _container_range(bits: int, signed: bool) -> tuple[int, int]:
    if bits <= 8:
        return (-128, 127) if signed else (0, 255)
    return (-(1 << 15), (1 << 15) - 1) if signed else (0, (1 << 16) - 1)


def _onnx_param_layout(spec: QuantSpec, ndim: int, what: str) -> tuple[int, int]:
    """``(axis, block_size)`` of ONNX Q/DQ for a granularity on a tensor of ``ndim`` dimensions."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return 1, 0
    if isinstance(g, PerChannel):
        return g.axis % ndim, 0
    if isinstance(g, PerGroup):
        return g.axis % ndim, g.size
    raise ValueError(f"{what}: granularity {g!r} has no ONNX QuantizeLinear equivalent")


def unsupported_reason(layer: QuantLayer) -> str | None:
    """Why ``layer`` cannot be exported (``None`` if it can)."""
    if not layer.frozen:
        return "not frozen: call lb.freeze(q) before exporting"
    aq = layer.input_quant
    if aq is not None and aq.enabled and aq.calibrated:
        g = aq.spec.granularity
        if aq.spec.dynamic and not isinstance(g, (PerTensor, PerToken)):
            return f"dynamic activations with {type(g).__name__} granularity (only PerTensor and PerToken are exported)"
        if not aq.spec.dynamic and isinstance(g, PerToken):
            return "static PerToken activations"
        if isinstance(g, PerToken) and layer.channel_dim != -1:
            return "PerToken activations of a convolution (its last axis, the length, varies)"
    if not layer.weight_quant.enabled:
        return "its weight quantizer is disabled"
    return None


@dataclass(frozen=True)
class Int4Initializer:
    """An initializer traced as 8-bit codes that the ONNX file stores as INT4/UINT4 (packed)."""

    packed: torch.Tensor       # uint8, ONNX INT4 layout (lowbit.ops.packing)
    dims: tuple[int, ...]
    signed: bool


class _InputQDQ(nn.Module):
    def __init__(self, spec: QuantSpec, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                 features: int) -> None:
        super().__init__()
        self.spec = spec
        self.features = features          # static size of the last axis (a Linear's in_features)
        if not spec.dynamic:
            self.register_buffer("scale", scale.detach().clone().float())
            self.register_buffer("zero_point", zero_point.detach().to(_container_dtype(spec.bits, spec.signed)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if not x.is_floating_point():
            return x
        if spec.dynamic:
            return torch.ops.lowbit.dynamic_quantize_dequantize(
                x, spec.bits, spec.signed, spec.symmetric, spec.narrow_range,
                isinstance(spec.granularity, PerToken), self.features)
        axis, block = _onnx_param_layout(spec, x.dim(), "input")
        clip = (spec.qmin, spec.qmax) != _container_range(spec.bits, spec.signed)
        return torch.ops.lowbit.quantize_dequantize(x, self.scale, self.zero_point, axis, block,
                                                    spec.qmin, spec.qmax, clip)


class ExportLayer(nn.Module):
    """Traceable stand-in of a frozen quantized layer (see the module docstring).

    Attributes:
        int4: ``{buffer name: Int4Initializer}`` for the buffers to store as 4-bit in the file.
        int8_format: ``"u8s8"`` or ``"u8u8"`` for 8-bit signed weights read by 8-bit activations
            (see the module docstring), else ``None``.
    """

    def __init__(self, layer: QuantLayer, integer: bool = False, int8_format: str | None = None,
                 portable: bool = True, name: str = "") -> None:
        super().__init__()
        aq = layer.input_quant
        use_input = aq is not None and aq.enabled and aq.calibrated
        features = int(layer._gemm_shape()[1]) if layer.channel_dim == -1 else 0
        self.input_qdq = _InputQDQ(aq.spec, aq.scale, aq.zero_point, features) if use_input else None
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.int4: dict[str, Int4Initializer] = {}
        spec = layer.weight_quant.spec
        qw = layer.qweight
        codes = qw.int_repr()                              # [out, in*k] (GEMM view)
        axis, block = _onnx_param_layout(spec, 2, "weight")
        codes, scale, zero_point, axis, self.to_native = layer.onnx_weight(codes, qw.scale.float(), qw.zero_point, axis)
        self.fn = layer.functional()                       # the float op, holding no reference to the layer
        self.axis, self.block_size = axis, block
        dtype = _container_dtype(spec.bits, spec.signed)
        codes = codes.contiguous().to(dtype)
        zero_point = zero_point.contiguous().to(dtype)
        self.integer = integer and fast_reason(layer) is None
        colsum = codes.to(torch.int32).sum(dim=0, dtype=torch.int32) if self.integer else None
        self.int8_format = None
        if use_input and aq.spec.bits <= 8 and spec.bits > 4 and dtype == torch.int8 and codes.numel():
            a_range = u8_activation_range(aq.spec.qmin, aq.spec.qmax, aq.spec.signed)
            w_range = (int(codes.min()), int(codes.max()))
            self.int8_format = choose_format(a_range, w_range, portable=portable, int8_format=int8_format, layer=name)
            if self.int8_format == "u8u8":   # w + 128 on a uint8 grid with zero point z_w + 128: the same weights
                codes = (codes.to(torch.int16) + 128).to(torch.uint8)
                zero_point = (zero_point.to(torch.int16) + 128).to(torch.uint8)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale.contiguous())
        self.register_buffer("weight_zero_point", zero_point)
        if self.integer:
            self.register_buffer("weight_colsum", colsum)      # of the signed codes (zero point 0)
            self.register_buffer("gemm_weight_zero_point", zero_point.reshape(-1)[:1].reshape(()).clone())
            if not aq.spec.dynamic:
                self.register_buffer("input_scale", self.input_qdq.scale)
                self.register_buffer("input_zero_point", self.input_qdq.zero_point)
            else:  # unused placeholders: the grid is computed from each input
                self.register_buffer("input_scale", torch.ones(()))
                self.register_buffer("input_zero_point", torch.zeros((), dtype=_container_dtype(8, aq.spec.signed)))
        elif spec.bits <= 4:
            from ..ops import packing

            for key, t in (("weight_codes", codes), ("weight_zero_point", zero_point)):
                self.int4[key] = Int4Initializer(packing.pack(t, 4), tuple(t.shape), spec.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integer and x.is_floating_point():
            sp = self.input_qdq.spec
            return torch.ops.lowbit.integer_linear(
                x, self.weight_codes, self.gemm_weight_zero_point, self.weight_colsum,
                self.weight_scale, self.bias, self.input_scale,
                self.input_zero_point, sp.bits, sp.signed, sp.symmetric, sp.narrow_range, sp.dynamic,
                isinstance(sp.granularity, PerToken), self.input_qdq.features)
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        w = torch.ops.lowbit.dequantize(self.weight_codes, self.weight_scale, self.weight_zero_point,
                                        self.axis, self.block_size)
        if self.to_native is not None:
            w = self.to_native(w)
        return self.fn(x, w, self.bias)


def export_layer(name: str, layer: QuantLayer, integer: bool = False, int8_format: str | None = None,
                 portable: bool = True) -> ExportLayer:
    """The :class:`ExportLayer` of ``layer``; ``ValueError`` naming ``name`` if it cannot be exported.

    ``integer``: a Linear whose grids allow it (:func:`lowbit.integer.fast_reason`) is written with
    ``MatMulInteger`` on its int8 codes instead of QDQ around a float MatMul. ``int8_format`` and
    ``portable``: see :func:`lowbit.integer.cpu.choose_format`."""
    why = unsupported_reason(layer)
    if why is not None:
        raise ValueError(f"cannot export layer {name!r}: {why}")
    try:
        return ExportLayer(layer, integer, int8_format, portable, name)
    except ValueError as e:
        raise ValueError(f"cannot export layer {name!r}: {e}") from e


class ExportEmbedding(nn.Module):
    """Traceable stand-in of a frozen :class:`QuantEmbedding`: ``Gather(DequantizeLinear(codes), ids)``.

    Has the attributes :func:`lowbit.export.onnx_export.export_onnx` reads from an :class:`ExportLayer`
    (``int4``, ``block_size``, ``input_qdq`` = None, ``integer`` = False).
    """

    def __init__(self, table: QuantEmbedding) -> None:
        super().__init__()
        spec = table.weight_quant.spec
        qw = table.qweight
        self.axis, self.block_size = _onnx_param_layout(spec, 2, "embedding")
        dtype = _container_dtype(spec.bits, spec.signed)
        codes = qw.int_repr().contiguous().to(dtype)
        zero_point = qw.zero_point.contiguous().to(dtype)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", qw.scale.float().contiguous())
        self.register_buffer("weight_zero_point", zero_point)
        self.input_qdq = None
        self.integer = False
        self.int4: dict[str, Int4Initializer] = {}
        if spec.bits <= 4:
            from ..ops import packing

            for key, t in (("weight_codes", codes), ("weight_zero_point", zero_point)):
                self.int4[key] = Int4Initializer(packing.pack(t, 4), tuple(t.shape), spec.signed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = torch.ops.lowbit.dequantize(self.weight_codes, self.weight_scale, self.weight_zero_point,
                                        self.axis, self.block_size)
        return F.embedding(ids, w)


def export_embedding(name: str, table: QuantEmbedding) -> ExportEmbedding:
    """The :class:`ExportEmbedding` of ``table``; ``ValueError`` naming ``name`` if it cannot be exported."""
    if not table.frozen:
        raise ValueError(f"cannot export embedding {name!r}: not frozen: call lb.freeze(q) before exporting")
    if not table.weight_quant.enabled:
        raise ValueError(f"cannot export embedding {name!r}: its weight quantizer is disabled")
    return ExportEmbedding(table)
