"""``gguf_grid``: pin each weight grid to scales a GGUF block type holds exactly (before GPTQ).

llama.cpp's Q8_0/Q4_0 blocks store one fp16 scale per 32 weights, Q4_K one fp16 ``d`` per 256
weights and 6-bit multipliers per 32 (:mod:`lowbit.ops.gguf_grid`). This transform takes each
quantized layer's fitted grid (its observer's ``(scale, zero_point)`` for PerGroup(32)), rounds the
scales to representable values (:func:`lowbit.ops.gguf_grid.snap_scales`) and pins them
(``weight_quant.fix_qparams``); ``lb.gptq(..., keep_grid=True)`` then only chooses the codes, so
what GPTQ optimises is exactly what ``lb.export_gguf`` writes and llama.cpp dequantizes.
"""
from __future__ import annotations

import logging

from torch import nn

from ..modules.quant_weight import QuantWeight
from ..ops.gguf_grid import BLOCK, GGUF_TYPES, SUPER_BLOCK, snap_scales
from ..spec import PerGroup
from .pipeline import register_transform

__all__ = ["gguf_grid"]

log = logging.getLogger(__name__)


def gguf_grid(q: nn.Module, qtype: str = "q8_0") -> dict[str, str]:
    """Pin the weight grids of ``q`` (from ``lb.quantize``, before ``lb.freeze``) to GGUF ``qtype`` scales.

    Returns ``{layer name: type its grid now fits}``: ``qtype``, or ``"q4_0"`` for a Q4_K layer whose
    rows are not a multiple of 256 (the fallback), or a reason the layer was left alone (its
    grid is not PerGroup(32) along the rows, or the rows are not a multiple of 32).
    """
    if qtype not in GGUF_TYPES:
        raise ValueError(f"qtype must be one of {GGUF_TYPES}, got {qtype!r}")
    done: dict[str, str] = {}
    for name, m in q.named_modules():
        if not isinstance(m, QuantWeight) or m.frozen or not m.weight_quant.enabled:
            continue
        g = m.weight_quant.spec.granularity
        cols = m._codes_shape()[1]
        if not (isinstance(g, PerGroup) and g.size == BLOCK and g.axis in (-1, 1)) or cols % BLOCK:
            done[name] = f"left alone: grid {g} on rows of {cols} is not PerGroup(32) on whole blocks"
            continue
        scale, zero_point = m.weight_quant.qparams(m.weight)
        m.weight_quant.fix_qparams(snap_scales(scale, qtype), zero_point)
        done[name] = "q4_0" if qtype == "q4_k" and cols % SUPER_BLOCK else qtype
    fallback = [n for n, t in done.items() if t == "q4_0" and qtype == "q4_k"]
    if fallback:
        log.info("gguf_grid: %d layers have rows that are not a multiple of 256 and get Q4_0 scales: %s",
                 len(fallback), ", ".join(fallback))
    q.lowbit_gguf_grid = done
    return done


register_transform("gguf_grid", "quantized", lambda q, batches, **o: (gguf_grid(q, **o), q)[1])
