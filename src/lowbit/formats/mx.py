"""Shared by the OCP Microscaling formats (OCP Microscaling Formats (MX) Specification v1.0, 2023).

A block of ``k = 32`` elements shares one scale ``X``, an E8M0 number (a power of two
``2^(E - 127)``, ``E`` in 0..254; 255 is NaN). Section 6.3 of the spec chooses it from the
block's largest magnitude::

    X = 2^(floor(log2(max_i |V_i|)) - emax_elem)

where ``emax_elem`` is the exponent of the element type's largest normal (E2M1: 2, E4M3: 8,
E5M2: 15, INT8: 0); the elements are ``V_i / X`` converted to the element type with
roundTiesToEven, saturating (values beyond the largest normal are clamped to it). An all-zero
block gets ``X = 1``. The shared exponent is clamped to the E8M0 range [-127, 127].
"""
from __future__ import annotations

import torch

from .base import NumberFormat

__all__ = ["MXMixin", "e8m0_scale"]


def e8m0_scale(amax: torch.Tensor, emax_elem: int) -> torch.Tensor:
    """``2^(floor(log2 amax) - emax_elem)`` per entry (1 where ``amax`` is 0 or not finite)."""
    a = amax.to(torch.float64)
    ok = torch.isfinite(a) & (a > 0)
    _, e = torch.frexp(torch.where(ok, a, torch.ones_like(a)))  # a = m 2^e, m in [0.5, 1)
    shared = (e.to(torch.float64) - 1 - emax_elem).clamp(-127, 127)
    x = torch.pow(torch.full_like(a, 2.0), shared)
    return torch.where(ok, x, torch.ones_like(x)).to(amax.dtype)


class MXMixin(NumberFormat):
    """Mixed in before a table format: fixes the block size and the E8M0 scale rule."""

    block_size = 32
    default_block = 32
    scale_bits = 8
    has_nan = False

    @property
    def emax_elem(self) -> int:
        import math

        return int(math.floor(math.log2(self.max_value)))

    def scale_for_range(self, r: torch.Tensor) -> torch.Tensor:
        return e8m0_scale(r, self.emax_elem)
