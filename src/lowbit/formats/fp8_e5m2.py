"""``"fp8_e5m2"``: OCP 8-bit floating point E5M2 (IEEE-like: bias 15, infinities and NaN).

Largest normal 57344 = 2^15 x 1.75, smallest subnormal 2^-16. Codes are the 8-bit patterns
(``torch.float8_e5m2`` viewed as uint8); encoding saturates at +-57344 (never produces inf) and
rounds to nearest even. Default scale: absmax, ``s = max|x| / 57344``.
Reference: OCP 8-bit Floating Point Specification (OFP8) rev 1.0, 2023. ONNX: ``FLOAT8E5M2``.
"""
from __future__ import annotations

import torch

from .minifloat import MinifloatFormat

__all__ = ["FP8E5M2"]


class FP8E5M2(MinifloatFormat):
    name = "fp8_e5m2"
    bits = 8
    exp_bits, man_bits, bias = 5, 2, 15
    finite_top = False
    has_nan = True
    reference = "OCP 8-bit Floating Point Specification (OFP8) rev 1.0, 2023: E5M2"

    def nan_code(self) -> int:
        return 0x7F

    def onnx_types(self, spec):
        from onnx import TensorProto

        return TensorProto.FLOAT8E5M2, torch.float8_e5m2
