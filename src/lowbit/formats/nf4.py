"""``"nf4"`` and ``"nf4_dq"``: 4-bit NormalFloat (Dettmers et al., "QLoRA: Efficient Finetuning
of Quantized LLMs", NeurIPS 2023, section 3 and appendix E).

The 16 levels are quantiles of N(0, 1) normalised to [-1, 1], with an exact zero: 8 positive
levels ``Phi^-1(p_i)`` for ``p_i`` evenly spaced from ``delta`` down to 1/2 (the last dropped),
7 negative ones the same with 8 points, ``delta = 1 - (1/32 + 1/30) / 2`` so that the extreme
quantiles are finite; all divided by the largest (float32 evaluation points and division,
as the paper's reference implementation). Computed here from that definition (the tests
compare with the table printed in the paper).

Blocks of 64 (``PerGroup(64)``) with an absmax scale ``s = max|x|``; codes 0..15 index the levels
in ascending order (code 7 is 0) and are stored two per byte. ``"nf4_dq"`` adds QLoRA's double
quantization: the block scales ``c`` of a tensor are centred by their mean ``mu`` and quantized
to 8 bits (FP8 E4M3, absmax per block of 256 scales):
``c^ = e4m3(( c - mu) / s2) s2 + mu`` with ``s2 = max|c - mu| / 448`` per block, which costs
``8/64 + 64/(64*256)`` instead of ``32/64`` bits per weight.
"""
from __future__ import annotations

import torch

from .base import TableFormat

__all__ = ["NF4", "NF4DoubleQuant", "nf4_levels"]

_OFFSET = 0.9677083  # 1 - (1/32 + 1/30) / 2, to the 7 digits of QLoRA's reference code


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels (float32 values, returned as float64), ascending."""
    pos = torch.special.ndtri(torch.linspace(_OFFSET, 0.5, 9, dtype=torch.float32)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(_OFFSET, 0.5, 8, dtype=torch.float32)[:-1].double())
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return (v / v.max()).double()


class NF4(TableFormat):
    name = "nf4"
    bits = 4
    default_block = 64
    reference = "Dettmers et al., QLoRA, NeurIPS 2023"

    def decode_table(self) -> torch.Tensor:
        cache = self.__dict__.get("_table")
        if cache is None:
            cache = self.__dict__["_table"] = nf4_levels()
        return cache


class NF4DoubleQuant(NF4):
    name = "nf4_dq"
    coupled_scales = True
    dq_block = 256
    reference = "Dettmers et al., QLoRA, NeurIPS 2023 (double quantization)"

    def bits_per_weight(self, spec, numel: int | None = None) -> float:
        per = getattr(spec.granularity, "size", None) or numel or 1
        return self.bits + 8.0 / per + 64.0 / (per * self.dq_block)

    def finish_scales(self, scale: torch.Tensor, spec) -> torch.Tensor:
        from . import get

        e4m3 = get("fp8_e4m3")
        c = scale.reshape(-1).to(torch.float32)
        mu = c.mean()
        d = c - mu
        n = d.numel()
        pad = (-n) % self.dq_block
        blocks = torch.nn.functional.pad(d, (0, pad)).reshape(-1, self.dq_block)
        s2 = e4m3.scale_for_range(blocks.abs().amax(dim=1))[:, None]
        dq = (e4m3.round(blocks / s2) * s2).reshape(-1)[:n]
        out = (dq + mu).clamp_min(torch.finfo(torch.float32).tiny)
        return out.reshape(scale.shape).to(scale.dtype)
