"""``QTensor``: a quantized tensor held as integers plus its grid.

``QTensor`` stores the integer codes ``q``, ``scale``, ``zero_point`` and the :class:`QuantSpec`;
``dequantize()`` returns ``(q - zero_point) * scale``. Codes of 4 bits or fewer are bit-packed
(two or four per byte, ONNX layout, see :mod:`lowbit.ops.packing`), so ``nbytes`` is the real
storage: a 4-bit weight takes an eighth of its float32 size plus the scales.
"""
from __future__ import annotations

import math

import torch

from . import ops
from .ops import packing
from .spec import QuantSpec

__all__ = ["QTensor"]


class QTensor:
    """Integer codes + ``scale`` + ``zero_point`` + ``spec``; see the module docstring.

    Build one with :meth:`from_float` (or from existing codes with :meth:`from_int`).
    """

    __slots__ = ("data", "scale", "zero_point", "spec", "shape", "packed")

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 spec: QuantSpec, shape: torch.Size | tuple[int, ...], packed: bool) -> None:
        self.data = data
        self.scale = scale
        self.zero_point = zero_point
        self.spec = spec
        self.shape = torch.Size(shape)
        self.packed = packed

    @classmethod
    def from_int(cls, q: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor,
                 pack: bool = True) -> "QTensor":
        """Wrap integer codes ``q`` (validated against ``spec``); packs them if ``bits <= 4``."""
        if q.is_floating_point():
            raise TypeError(f"q must hold integer codes, got {q.dtype}; use QTensor.from_float")
        scale = ops.params.as_param(scale, "scale", torch.float32, q.device)
        zero_point = ops.params.as_param(zero_point, "zero_point", torch.int32, q.device)
        ops.params.check_qparams(q.shape, spec, scale, zero_point)
        if q.numel() and (int(q.min()) < spec.qmin or int(q.max()) > spec.qmax):
            raise ValueError(f"q has codes outside [{spec.qmin}, {spec.qmax}] of {spec}")
        do_pack = pack and spec.bits <= 4
        data = packing.pack(q, spec.bits) if do_pack else q.to(spec.storage_dtype)
        return cls(data, scale.reshape(spec.param_shape(q.shape)), zero_point.to(torch.int32).reshape(spec.param_shape(q.shape)),
                   spec, q.shape, do_pack)

    @classmethod
    def from_float(cls, x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                   zero_point: torch.Tensor | None = None, observer: str = "minmax", pack: bool = True,
                   generator: torch.Generator | None = None) -> "QTensor":
        """Quantize ``x``; without ``scale``/``zero_point`` they come from ``ops.choose_qparams(x, spec, observer)``."""
        if (scale is None) != (zero_point is None):
            raise ValueError("pass both scale and zero_point, or neither (to choose them from x)")
        if scale is None:
            scale, zero_point = ops.choose_qparams(x, spec, observer)
        q = ops.quantize(x, spec, scale, zero_point, generator=generator)
        return cls.from_int(q, spec, scale, zero_point, pack=pack)

    def int_repr(self) -> torch.Tensor:
        """The integer codes, unpacked, shaped like the original tensor (``spec.storage_dtype``)."""
        if not self.packed:
            return self.data
        flat = packing.unpack(self.data, self.spec.bits, math.prod(self.shape), self.spec.signed,
                              self.spec.storage_dtype)
        return flat.reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        """``(q - zero_point) * scale`` as float32."""
        return ops.dequantize(self.int_repr(), self.spec, self.scale, self.zero_point)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes (packed) + scales + zero points."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero_point))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device: torch.device | str) -> "QTensor":
        return QTensor(self.data.to(device), self.scale.to(device), self.zero_point.to(device),
                       self.spec, self.shape, self.packed)

    def __repr__(self) -> str:
        return (f"QTensor(shape={tuple(self.shape)}, spec={self.spec}, packed={self.packed}, "
                f"nbytes={self.nbytes})")
