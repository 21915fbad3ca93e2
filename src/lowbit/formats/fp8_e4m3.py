"""``"fp8_e4m3"``: OCP 8-bit floating point E4M3 ("E4M3FN": bias 7, no infinities, NaN = S.1111.111).

Largest normal 448 = 2^8 x 1.75, smallest subnormal 2^-9. Codes are the 8-bit patterns
(``torch.float8_e4m3fn`` viewed as uint8). Encoding is saturating round-to-nearest-even:
``code = cast(clamp(x / s, -448, 448))``. Default scale: absmax, ``s = max|x| / 448``.
Reference: OCP 8-bit Floating Point Specification (OFP8), rev. 1.0, 2023. ONNX: ``FLOAT8E4M3FN``
QuantizeLinear/DequantizeLinear (opset 19).
"""
from __future__ import annotations

import torch

from .minifloat import MinifloatFormat

__all__ = ["FP8E4M3"]


class FP8E4M3(MinifloatFormat):
    name = "fp8_e4m3"
    bits = 8
    exp_bits, man_bits, bias = 4, 3, 7
    finite_top = True
    nan_magnitudes = (0x7F,)
    has_nan = True
    reference = "OCP 8-bit Floating Point Specification (OFP8) rev 1.0, 2023: E4M3"

    def onnx_types(self, spec):
        from onnx import TensorProto

        return TensorProto.FLOAT8E4M3FN, torch.float8_e4m3fn
