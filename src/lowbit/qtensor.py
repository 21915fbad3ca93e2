"""``QTensor``: a quantized tensor held as integers plus its grid.

``QTensor`` stores the integer codes ``q``, ``scale``, ``zero_point`` and the :class:`QuantSpec`;
``dequantize()`` returns ``(q - zero_point) * scale`` (for the formats of :mod:`lowbit.formats`,
``decode(q) * scale``: FP8 bit patterns, NF4/MXFP4 table indices, packed two per byte when 4-bit). Storage is kept honest and small:

* codes of 4 bits or fewer are bit-packed (two or four per byte, ONNX layout, see
  :mod:`lowbit.ops.packing`); wider codes use the narrowest integer dtype (unsigned 16-bit codes
  are stored as ``torch.uint16``);
* a zero point equal to the grid's middle code everywhere (always so for symmetric specs) is not
  stored at all; other zero points are stored in the codes' dtype (one byte for 8 bits or fewer);
* scales are float32 by default; ``scale_dtype=torch.float16`` (or bfloat16) halves them, and
  the codes are then computed with the rounded scale so that they match what is stored.

``nbytes`` counts exactly those tensors. A 4-bit weight with one float32 scale per group of 128
costs ``4 + 32/128 = 4.25`` bits per element (``4.125`` with float16 scales).
"""
from __future__ import annotations

import math

import torch

from . import ops
from .ops import packing
from .spec import QuantSpec

__all__ = ["QTensor"]

_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _code_dtype(spec: QuantSpec) -> torch.dtype:
    """Dtype of stored (unpacked) codes and zero points: the narrowest that holds the grid."""
    if spec.bits > 8 and not spec.signed and hasattr(torch, "uint16"):
        return torch.uint16
    return spec.storage_dtype


def _to_scale_dtype(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` in ``dtype``, rounded up (so a range that fit the grid still fits).

    Raises ``ValueError`` if that costs more than 1/64 of the scale (an underflow to subnormals
    or zero, an overflow): the step would no longer be the one that was chosen.
    """
    if dtype not in _SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be one of {_SCALE_DTYPES}, got {dtype}")
    if scale.dtype == dtype:
        return scale
    low = scale.to(dtype)
    up = torch.nextafter(low, torch.full_like(low, math.inf))
    rounded = torch.where(low.to(scale.dtype) < scale, up, low)
    wide = rounded.to(torch.float64)
    rel = (wide - scale.to(torch.float64)).abs() / scale.to(torch.float64)
    if not bool(torch.isfinite(wide).all()) or not bool((rel <= 2.0 ** -6).all()):
        bad = float(scale.reshape(-1)[int(rel.nan_to_num(math.inf).argmax())])
        raise ValueError(f"scale {bad:g} does not fit scale_dtype={dtype} (it would lose its precision "
                         "or overflow); use scale_dtype=torch.bfloat16 or torch.float32")
    return rounded


class QTensor:
    """Integer codes + ``scale`` + ``zero_point`` + ``spec``; see the module docstring.

    Build one with :meth:`from_float` (or from existing codes with :meth:`from_int`). The
    constructor takes the stored form: ``zero_point=None`` means the grid's middle code.
    """

    __slots__ = ("data", "scale", "_zero_point", "spec", "shape", "packed")

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 spec: QuantSpec, shape: torch.Size | tuple[int, ...], packed: bool) -> None:
        self.data = data
        self.scale = scale
        self._zero_point = zero_point
        self.spec = spec
        self.shape = torch.Size(shape)
        self.packed = packed

    @classmethod
    def from_int(cls, q: torch.Tensor, spec: QuantSpec, scale, zero_point, pack: bool = True,
                 scale_dtype: torch.dtype | None = None) -> "QTensor":
        """Wrap integer codes ``q`` (validated against ``spec``); packs them if ``bits <= 4``.

        ``scale_dtype`` (default: the dtype of ``scale``, float32 for a number) is how the scale
        is stored; ``q`` is taken as is, so pass codes computed with that scale.
        """
        if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
            raise TypeError(f"q must be an integer tensor of codes, got {getattr(q, 'dtype', type(q).__name__)}; "
                            "use QTensor.from_float for float tensors")
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a lowbit.QuantSpec, got {type(spec).__name__}")
        scale = ops.params.as_param(scale, "scale", torch.float32, q.device)
        zero_point = ops.params.as_param(zero_point, "zero_point", torch.int32, q.device)
        ops.params.check_qparams(q.shape, spec, scale, zero_point)
        scale = _to_scale_dtype(scale.detach(), scale_dtype or scale.dtype)
        codes = q.detach()   # checked and packed in its own dtype (an int32 copy would be 4 bytes per code)
        lo, hi = spec.number_format.code_range(spec)
        if q.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise ValueError(f"q has codes outside [{lo}, {hi}] of {spec}")
        pshape = spec.param_shape(q.shape)
        zp = zero_point.detach().to(torch.int32).reshape(pshape)
        stored_zp = None if bool((zp == spec.symmetric_zero_point).all()) else zp.to(_code_dtype(spec))
        do_pack = pack and spec.bits <= 4
        data = packing.pack(codes, spec.bits) if do_pack else codes.to(_code_dtype(spec), copy=True)
        return cls(data, scale.reshape(pshape).clone(), stored_zp, spec, q.shape, do_pack)

    @classmethod
    def from_float(cls, x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                   zero_point: torch.Tensor | None = None, observer: str = "minmax", pack: bool = True,
                   generator: torch.Generator | None = None,
                   scale_dtype: torch.dtype | None = None) -> "QTensor":
        """Quantize ``x``; without ``scale``/``zero_point`` they come from ``ops.choose_qparams(x, spec, observer)``.

        With ``scale_dtype`` (e.g. ``torch.float16``) the scale is rounded up to that dtype first
        and ``x`` is quantized with the rounded scale.
        """
        if (scale is None) != (zero_point is None):
            raise ValueError("pass both scale and zero_point, or neither (to choose them from x)")
        if scale is None:
            scale, zero_point = ops.choose_qparams(x, spec, observer)
        if scale_dtype is not None:
            scale = _to_scale_dtype(ops.params.as_param(scale, "scale", torch.float32).detach(), scale_dtype)
        q = ops.quantize(x, spec, scale, zero_point, generator=generator)
        return cls.from_int(q, spec, scale, zero_point, pack=pack, scale_dtype=scale_dtype)

    @property
    def zero_point(self) -> torch.Tensor:
        """Zero points as int32, shaped like ``scale`` (the middle code when it is not stored)."""
        if self._zero_point is None:
            return torch.full(tuple(self.scale.shape), self.spec.symmetric_zero_point, dtype=torch.int32,
                              device=self.scale.device)
        return self._zero_point.to(torch.int32)

    def int_repr(self) -> torch.Tensor:
        """The integer codes, unpacked, shaped like the original tensor (``spec.storage_dtype``)."""
        if not self.packed:
            return self.data.to(self.spec.storage_dtype)
        flat = packing.unpack(self.data, self.spec.bits, math.prod(self.shape),
                              self.spec.number_format.signed_codes(self.spec),
                              self.spec.storage_dtype)
        return flat.reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        """``(q - zero_point) * scale`` as float32 (float64 if the scale is float64)."""
        scale = self.scale if self.scale.dtype == torch.float64 else self.scale.float()
        return ops.dequantize(self.int_repr(), self.spec, scale, self.zero_point, validate=False)  # checked in from_int

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes (packed) + scales + zero points (if stored)."""
        stored = [self.data, self.scale] + ([] if self._zero_point is None else [self._zero_point])
        return sum(t.numel() * t.element_size() for t in stored)

    @property
    def bits_per_element(self) -> float:
        """``8 * nbytes / numel``: the real cost of one element, scales included."""
        return 8.0 * self.nbytes / max(math.prod(self.shape), 1)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device: torch.device | str) -> "QTensor":
        zp = None if self._zero_point is None else self._zero_point.to(device)
        return QTensor(self.data.to(device), self.scale.to(device), zp, self.spec, self.shape, self.packed)

    def __repr__(self) -> str:
        return (f"QTensor(shape={tuple(self.shape)}, spec={self.spec}, packed={self.packed}, "
                f"nbytes={self.nbytes}, scale_dtype={self.scale.dtype})")
