"""Shared by the FP8 formats and the MX/NV float elements: a sign/exponent/mantissa table."""
from __future__ import annotations

import torch

from .base import SignMagnitudeFormat, minifloat_table

__all__ = ["MinifloatFormat"]


class MinifloatFormat(SignMagnitudeFormat):
    """A minifloat with ``exp_bits``/``man_bits``/``bias``; see :func:`~lowbit.formats.base.minifloat_table`.

    Conversion is saturating roundTiesToEven: ``|v|`` beyond the largest normal becomes it (the
    "saturate" mode of ONNX QuantizeLinear and of the OCP MX conversion).
    """

    exp_bits = 4
    man_bits = 3
    bias = 7
    finite_top = True
    nan_magnitudes: tuple[int, ...] = ()

    def decode_table(self) -> torch.Tensor:
        cache = self.__dict__.setdefault("_table", None)
        if cache is None:
            cache = self.__dict__["_table"] = minifloat_table(self.exp_bits, self.man_bits, self.bias,
                                                              self.finite_top, self.nan_magnitudes)
        return cache

    @property
    def emax(self) -> int:
        """Exponent of the largest normal (OCP MX: ``emax_elem``)."""
        import math

        return int(math.floor(math.log2(self.max_value)))

    def nan_code(self) -> int:
        t = self.decode_table()
        return int(torch.nonzero(torch.isnan(t[: 1 << (self.bits - 1)]))[-1])
