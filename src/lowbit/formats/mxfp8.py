"""``"mxfp8"``: OCP MX with FP8 E4M3 elements (max 448, ``emax_elem = 8``), blocks of 32, E8M0
scales: 8.25 bits per weight. Codes are the E4M3 bit patterns.
Reference: OCP Microscaling Formats (MX) Specification v1.0, 2023, sections 5.3 and 6.3.
"""
from __future__ import annotations

from .minifloat import MinifloatFormat
from .mx import MXMixin

__all__ = ["MXFP8"]


class MXFP8(MXMixin, MinifloatFormat):
    name = "mxfp8"
    bits = 8
    exp_bits, man_bits, bias = 4, 3, 7
    finite_top = True
    nan_magnitudes = (0x7F,)
    reference = "OCP Microscaling Formats (MX) v1.0, 2023: MXFP8 (E4M3)"
