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
from ..modules.quantizer import WeightQuantizer
from ..ops.gguf_grid import BLOCK, GGUF_TYPES, SUPER_BLOCK, snap_scales
from ..spec import PerGroup
from .pipeline import register_transform

__all__ = ["gguf_grid"]

log = logging.getLogger(__name__)


def gguf_grid(q: nn.Module, qtype: str = "q8_0", fallback: str = "q5_0") -> dict[str, str]:
    """Pin the weight grids of ``q`` (from ``lb.quantize``, before ``lb.freeze``) to GGUF ``qtype`` scales.

    ``fallback`` (``"q5_0"``, as llama.cpp's own Q4_K quantization does, or ``"q4_0"``) is the type
    of Q4_K layers whose rows are not a multiple of 256: their grid becomes that type's (a 5-bit
    symmetric grid for ``q5_0``, refitted with the layer's observer) with fp16 scales.
    Returns ``{layer name: type its grid now fits}``, or a reason the layer was left alone (its
    grid is not PerGroup(32) along the rows, or the rows are not a multiple of 32).
    """
    if qtype not in GGUF_TYPES:
        raise ValueError(f"qtype must be one of {GGUF_TYPES}, got {qtype!r}")
    if fallback not in ("q5_0", "q4_0"):
        raise ValueError(f"fallback must be 'q5_0' or 'q4_0', got {fallback!r}")
    done: dict[str, str] = {}
    for name, m in q.named_modules():
        if not isinstance(m, QuantWeight) or m.frozen or not m.weight_quant.enabled:
            continue
        wq = m.weight_quant
        g = wq.spec.granularity
        cols = m._codes_shape()[1]
        if not (isinstance(g, PerGroup) and g.size == BLOCK and g.axis in (-1, 1)) or cols % BLOCK:
            done[name] = f"left alone: grid {g} on rows of {cols} is not PerGroup(32) on whole blocks"
            continue
        kind = qtype
        if qtype == "q4_k" and cols % SUPER_BLOCK:
            kind = fallback
            if fallback == "q5_0" and wq.spec.bits < 5:
                spec = wq.spec.replace(bits=5, symmetric=True, signed=True)   # a new quantizer: refit on 5 bits
                wq = m.weight_quant = WeightQuantizer(spec, wq.observer, wq.observer_options, wq.ste)
        scale, zero_point = wq.qparams(m.weight)
        wq.fix_qparams(snap_scales(scale, kind), zero_point)
        done[name] = kind
    moved = [n for n, t in done.items() if qtype == "q4_k" and t != "q4_k" and not t.startswith("left")]
    if moved:
        log.info("gguf_grid: %d layers have rows that are not a multiple of 256 and get the %s grid: %s",
                 len(moved), fallback, ", ".join(moved))
    q.lowbit_gguf_grid = done
    return done


register_transform("gguf_grid", "quantized", lambda q, batches, **o: (gguf_grid(q, **o), q)[1])
