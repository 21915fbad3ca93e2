"""``"int"``: the integer grids of :class:`~lowbit.QuantSpec` (the default format).

``q = clamp(round_half_even(x / s) + z, qmin, qmax)``, ``x^ = (q - z) s`` (ONNX
QuantizeLinear/DequantizeLinear). The arithmetic stays in the fused kernels of
:mod:`lowbit.ops` (``integer_grid = True``), so results are exactly those lowbit always had; this
object states the grid's facts (range, storage, ONNX types) for the spec and the rest of lowbit.
"""
from __future__ import annotations

import torch

from .base import NumberFormat

__all__ = ["IntFormat"]


class IntFormat(NumberFormat):
    name = "int"
    integer_grid = True
    reference = "ONNX QuantizeLinear/DequantizeLinear; Jacob et al., CVPR 2018"

    def check_spec(self, spec) -> None:
        return None

    def code_range(self, spec) -> tuple[int, int]:
        low = -(1 << (spec.bits - 1)) if spec.signed else 0
        high = (1 << (spec.bits - 1)) - 1 if spec.signed else (1 << spec.bits) - 1
        return (low + 1 if spec.narrow_range else low), high

    def signed_codes(self, spec) -> bool:
        return spec.signed

    def zero_point_range(self, spec) -> tuple[int, int]:
        return self.code_range(spec)

    def symmetric_zero_point(self, spec) -> int:
        return 0 if spec.signed else 1 << (spec.bits - 1)

    def steps_in_range(self, spec) -> float:
        lo, hi = self.code_range(spec)
        return (hi - self.symmetric_zero_point(spec)) if spec.symmetric else (hi - lo)

    def storage_dtype(self, spec) -> torch.dtype:
        if spec.bits <= 8:
            return torch.int8 if spec.signed else torch.uint8
        return torch.int16 if spec.signed else torch.int32

    def bits_per_weight(self, spec, numel: int | None = None) -> float:
        from .base import _elements_per_scale

        per = _elements_per_scale(spec, numel)
        zp = 0 if spec.symmetric else min(spec.bits, 8) if spec.bits <= 8 else 16
        return spec.bits + ((self.scale_bits + zp) / per if per else 0.0)

    def values(self, spec=None) -> torch.Tensor:
        """The codes minus the symmetric zero point (the grid at scale 1)."""
        if spec is None:
            raise ValueError("the int format's values depend on the spec: pass spec")
        lo, hi = self.code_range(spec)
        return torch.arange(lo, hi + 1, dtype=torch.float64) - self.symmetric_zero_point(spec)

    @property
    def max_value(self) -> float:
        raise ValueError("the int format's largest value depends on the spec: use spec.qmax")

    def onnx_types(self, spec):
        return None  # the integer exporters of lowbit.export handle it
