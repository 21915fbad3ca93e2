"""``"nvfp4"``: FP4 E2M1 elements in blocks of 16, each block scale an FP8 E4M3 number, times one
float32 scale per tensor (NVIDIA, "Introducing NVFP4 for efficient and accurate low-precision
inference", 2025; the Blackwell/TensorRT-LLM/ModelOpt format).

With block absmax scales ``c_b = max|x_b| / 6`` and the tensor scale ``g = max_b c_b / 448``,
each stored block scale is ``e4m3(c_b / g)`` and the effective scale is ``e4m3(c_b / g) g``
(rounded to nearest even; a block whose scale would round to zero gets the smallest E4M3
subnormal). 4 + 8/16 = 4.5 bits per weight (plus 32 bits per tensor).
"""
from __future__ import annotations

import torch

from .minifloat import MinifloatFormat

__all__ = ["NVFP4"]


class NVFP4(MinifloatFormat):
    name = "nvfp4"
    bits = 4
    exp_bits, man_bits, bias = 2, 1, 1
    finite_top = True
    block_size = 16
    default_block = 16
    scale_bits = 8
    coupled_scales = True
    reference = "NVIDIA NVFP4 (2025): E2M1 elements, E4M3 block scales of 16, FP32 tensor scale"

    def bits_per_weight(self, spec, numel: int | None = None) -> float:
        return self.bits + 8.0 / 16 + (32.0 / numel if numel else 0.0)

    def finish_scales(self, scale: torch.Tensor, spec) -> torch.Tensor:
        from . import get

        e4m3 = get("fp8_e4m3")
        c = scale.to(torch.float32)
        g = (c.max() / e4m3.max_value).clamp_min(torch.finfo(torch.float32).tiny)
        q = e4m3.round(c / g)
        q = torch.where(q > 0, q, torch.full_like(q, 2.0 ** -9))
        return (q * g).to(scale.dtype)
