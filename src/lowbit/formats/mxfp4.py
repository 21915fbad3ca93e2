"""``"mxfp4"``: OCP MX with FP4 E2M1 elements (values 0, 0.5, 1, 1.5, 2, 3, 4, 6; bias 1, no
inf/NaN), blocks of 32, E8M0 scales (``emax_elem = 2``): 4.25 bits per weight.
Reference: OCP Microscaling Formats (MX) Specification v1.0, 2023, sections 5.3 and 6.3.
"""
from __future__ import annotations

from .minifloat import MinifloatFormat
from .mx import MXMixin

__all__ = ["MXFP4"]


class MXFP4(MXMixin, MinifloatFormat):
    name = "mxfp4"
    bits = 4
    exp_bits, man_bits, bias = 2, 1, 1
    finite_top = True
    reference = "OCP Microscaling Formats (MX) v1.0, 2023: MXFP4"
