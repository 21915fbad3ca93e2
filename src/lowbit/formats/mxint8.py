"""``"mxint8"``: OCP MX with INT8 elements: two's complement codes with an implicit scale 2^-6
(values ``code / 64``, from -2 to 1 63/64; ``emax_elem = 0``), blocks of 32, E8M0 scales:
8.25 bits per weight. Elements round to nearest (ties to even code) and saturate.
Reference: OCP Microscaling Formats (MX) Specification v1.0, 2023, sections 5.3.3 and 6.3.
"""
from __future__ import annotations

import torch

from .base import TableFormat
from .mx import MXMixin

__all__ = ["MXINT8"]


class MXINT8(MXMixin, TableFormat):
    name = "mxint8"
    bits = 8
    code_signed = True
    reference = "OCP Microscaling Formats (MX) v1.0, 2023: MXINT8"

    def decode_table(self) -> torch.Tensor:
        idx = torch.arange(256, dtype=torch.float64)
        return torch.where(idx >= 128, idx - 256, idx) / 64.0

    @property
    def emax_elem(self) -> int:
        return 0
