"""GGUF block grids (llama.cpp): the integer grids whose scales the GGUF block types can hold exactly.

llama.cpp's block types store, per block of 32 weights of one row (ggml ``ggml-common.h``):

* ``Q8_0``: an fp16 scale ``d`` and 32 int8 codes: ``w = d * q``;
* ``Q4_0``: an fp16 ``d`` and 32 4-bit codes ``n`` in ``[0, 15]``: ``w = d * (n - 8)``;
* ``Q5_0``: the same with 5-bit codes: ``w = d * (n - 16)``;
* ``Q4_K`` (super-blocks of 256 = 8 sub-blocks of 32): fp16 ``d`` and ``dmin``, per sub-block
  6-bit integers ``sc_j`` and ``m_j`` and 4-bit codes ``n``: ``w = d*sc_j * n - dmin*m_j``.

On lowbit's grids (``w = (q - z) * s`` with one ``s`` per group of 32, ``QuantSpec(...,
granularity=PerGroup(32))``) these are exact when the scales are representable:
``s`` an fp16 number (Q8_0, Q4_0) or ``s_j = d * sc_j`` with one fp16 ``d`` per super-block and
``sc_j`` in ``[1, 63]`` (Q4_K; with ``dmin = 8 d`` and ``m_j = sc_j`` a symmetric signed 4-bit grid
is exact). :func:`snap_scales` rounds scales to such values (before GPTQ pins the grid), and
:func:`q4_k_decompose` finds ``d`` and ``sc_j`` back from stored scales.
"""
from __future__ import annotations

import torch

__all__ = ["GGUF_TYPES", "BLOCK", "SUPER_BLOCK", "fp16_exact", "fp16_round_up", "snap_scales", "q4_k_decompose"]

GGUF_TYPES = ("q8_0", "q4_0", "q5_0", "q4_k")
BLOCK = 32          # weights per block (Q8_0, Q4_0) and per Q4_K sub-block
SUPER_BLOCK = 256   # weights per Q4_K super-block (QK_K)


def fp16_exact(x: torch.Tensor) -> torch.Tensor:
    """Whether each element of ``x`` is a finite fp16 number (converts to fp16 and back unchanged)."""
    h = x.to(torch.float16)
    return torch.isfinite(h) & (h.to(x.dtype) == x)


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest positive fp16 value ``>= x`` (as ``x``'s dtype); ``x`` must be positive and < 65504."""
    h = x.to(torch.float16)
    h = torch.where(h.to(x.dtype) < x, torch.nextafter(h, torch.full_like(h, torch.inf)), h)
    tiny = torch.tensor(2.0 ** -24, dtype=torch.float16, device=x.device)   # smallest fp16 subnormal
    return torch.maximum(h, tiny).to(x.dtype)


def snap_scales(scale: torch.Tensor, qtype: str) -> torch.Tensor:
    """Per-group scales ``[rows, groups]`` rounded to values that GGUF ``qtype`` holds exactly.

    ``q8_0``/``q4_0``/``q5_0``: the nearest fp16 value (never 0). ``q4_k``: per super-block of 8 groups,
    ``d = fp16_round_up(max_j s_j / 63)`` and ``s_j -> d * clamp(round(s_j / d), 1, 63)`` (computed in
    float32, where ``d * sc`` is exact). Rows whose group count is not a multiple of 8 cannot be
    Q4_K; they get the fp16 rounding (their fallback type, Q5_0 or Q4_0, has fp16 scales). Returns float32.
    """
    if qtype not in GGUF_TYPES:
        raise ValueError(f"qtype must be one of {GGUF_TYPES}, got {qtype!r}")
    s = scale.detach().float()
    if s.dim() != 2:
        raise ValueError(f"scale must be [rows, groups] (PerGroup(32) scales of a 2-D weight), got {tuple(s.shape)}")
    if qtype != "q4_k" or s.shape[1] % (SUPER_BLOCK // BLOCK):
        h = s.to(torch.float16).float()
        return torch.where(h > 0, h, fp16_round_up(s.clamp_min(2.0 ** -24)))
    sb = s.reshape(s.shape[0], -1, SUPER_BLOCK // BLOCK)
    d = fp16_round_up(sb.amax(dim=-1, keepdim=True) / 63.0)
    sc = torch.clamp(torch.round(sb / d), 1, 63)
    return (d * sc).reshape(s.shape)


def q4_k_decompose(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(d [rows, n_super] float32 fp16-exact, sc [rows, groups] int)`` with ``d * sc == scale``
    exactly in float32, or None when some super-block has no such decomposition.

    ``scale`` is ``[rows, groups]`` with ``groups % 8 == 0``. Tries, per super-block, ``d =
    fp16(max_j s_j / k)`` for ``k = 63, 62, ..., 1`` and keeps the first ``d`` that reproduces all
    8 scales with integer ``sc_j`` in ``[1, 63]``.
    """
    s = scale.detach().float()
    rows, groups = s.shape
    if groups % (SUPER_BLOCK // BLOCK):
        return None
    sb = s.reshape(rows, -1, SUPER_BLOCK // BLOCK)
    smax = sb.amax(dim=-1, keepdim=True)
    found = torch.zeros_like(smax, dtype=torch.bool)
    best_d = torch.zeros_like(smax)
    for k in range(63, 0, -1):
        d = (smax / k).to(torch.float16).float()
        sc = torch.round(sb / d)
        ok = (d > 0) & ((d * sc == sb) & (sc >= 1) & (sc <= 63)).all(dim=-1, keepdim=True)
        new = ok & ~found
        best_d = torch.where(new, d, best_d)
        found |= ok
        if bool(found.all()):
            break
    if not bool(found.all()):
        return None
    sc = torch.round(sb / best_d).to(torch.int64).reshape(rows, groups)
    return best_d.reshape(rows, -1), sc
