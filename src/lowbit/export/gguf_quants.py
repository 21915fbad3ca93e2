"""GGUF block packers: lowbit codes and scales -> the bytes of llama.cpp's Q8_0, Q4_0 and Q4_K blocks.

Block layouts (ggml ``ggml-common.h``, all little-endian; ``QK = 32``, ``QK_K = 256``):

* ``block_q8_0`` (34 bytes / 32 weights): ``half d; int8 qs[32]``; ``w_i = d * qs[i]``.
* ``block_q4_0`` (18 bytes / 32 weights): ``half d; uint8 qs[16]``; byte ``i`` holds weight ``i``
  in its low nibble and weight ``i + 16`` in its high nibble; ``w = d * (nibble - 8)``.
* ``block_q5_0`` (22 bytes / 32 weights): ``half d; uint8 qh[4]; uint8 qs[16]``; the low 4 bits of
  the 5-bit code ``n_i`` are packed as in Q4_0, its top bit is bit ``i`` of the little-endian
  ``qh``; ``w = d * (n - 16)`` (llama.cpp's fallback for Q4_K rows that are not whole super-blocks).
* ``block_q4_K`` (144 bytes / 256 weights): ``half d; half dmin; uint8 scales[12]; uint8 qs[128]``.
  The 8 sub-block scales ``sc_j`` and mins ``m_j`` (6 bits each) are packed in ``scales``: for
  ``j < 4`` the low 6 bits of ``scales[j]`` are ``sc_j`` and of ``scales[j+4]`` are ``m_j``; for
  ``j >= 4`` ``scales[j+4]`` holds ``sc_j & 15`` (low nibble) and ``m_j & 15`` (high nibble), and the
  top 2 bits of ``sc_j``/``m_j`` sit in bits 6-7 of ``scales[j-4]``/``scales[j]``. ``qs`` is 4 chunks
  of 32 bytes: chunk ``c`` holds sub-block ``2c`` in the low nibbles and ``2c+1`` in the high ones.
  ``w = d*sc_j * n - dmin*m_j``.

:func:`gguf_blocks` finds the type that holds a lowbit :class:`~lowbit.QTensor` exactly (same
dequantized float32 values; see :mod:`lowbit.ops.gguf_grid`) and packs it; :func:`unpack_blocks`
is the inverse, for checks.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..ops.gguf_grid import BLOCK, SUPER_BLOCK, fp16_exact, q4_k_decompose
from ..qtensor import QTensor
from ..spec import PerGroup

__all__ = ["pack_q8_0", "pack_q4_0", "pack_q5_0", "pack_q4_k", "unpack_blocks", "gguf_blocks", "BYTES_PER_BLOCK"]

BYTES_PER_BLOCK = {"Q8_0": (34, BLOCK), "Q4_0": (18, BLOCK), "Q5_0": (22, BLOCK), "Q4_K": (144, SUPER_BLOCK)}


def _half_bytes(d: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(d.astype(np.float16)).view(np.uint8).reshape(*d.shape, 2)


def pack_q8_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``codes`` int ``[rows, n]`` in [-128, 127], ``d`` ``[rows, n/32]`` (fp16 values) -> uint8 ``[rows, n/32*34]``."""
    rows, n = codes.shape
    qs = codes.astype(np.int8).view(np.uint8).reshape(rows, n // BLOCK, BLOCK)
    return np.concatenate([_half_bytes(d), qs], axis=-1).reshape(rows, -1)


def pack_q4_0(nibbles: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``nibbles`` ``[rows, n]`` in [0, 15] (``w = d * (nibble - 8)``) -> uint8 ``[rows, n/32*18]``."""
    rows, n = nibbles.shape
    b = nibbles.astype(np.uint8).reshape(rows, n // BLOCK, 2, BLOCK // 2)
    qs = b[:, :, 0] | (b[:, :, 1] << np.uint8(4))
    return np.concatenate([_half_bytes(d), qs], axis=-1).reshape(rows, -1)


def pack_q5_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``codes`` ``[rows, n]`` in [0, 31] (``w = d * (code - 16)``) -> uint8 ``[rows, n/32*22]``."""
    rows, n = codes.shape
    c = codes.astype(np.uint8).reshape(rows, n // BLOCK, BLOCK)
    low = (c & 15).reshape(rows, n // BLOCK, 2, BLOCK // 2)
    qs = low[:, :, 0] | (low[:, :, 1] << np.uint8(4))
    qh = np.packbits(c >> 4, axis=-1, bitorder="little")            # bit i of the 32-bit qh = top bit of code i
    return np.concatenate([_half_bytes(d), qh, qs], axis=-1).reshape(rows, -1)


def pack_q4_k(nibbles: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``nibbles`` ``[rows, n]`` in [0, 15]; ``d``, ``dmin`` ``[rows, n/256]`` (fp16 values); ``sc``, ``m``
    ``[rows, n/32]`` in [0, 63] -> uint8 ``[rows, n/256*144]`` (``w = d*sc_j*nibble - dmin*m_j``)."""
    rows, n = nibbles.shape
    nsb = n // SUPER_BLOCK
    sc = sc.astype(np.uint8).reshape(rows, nsb, 8)
    m = m.astype(np.uint8).reshape(rows, nsb, 8)
    scales = np.empty((rows, nsb, 12), dtype=np.uint8)
    scales[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    scales[..., 4:8] = (m[..., 0:4] & 63) | ((m[..., 4:8] >> 4) << 6)
    scales[..., 8:12] = (sc[..., 4:8] & 15) | ((m[..., 4:8] & 15) << 4)
    b = nibbles.astype(np.uint8).reshape(rows, nsb, 4, 2, BLOCK)
    qs = (b[:, :, :, 0] | (b[:, :, :, 1] << np.uint8(4))).reshape(rows, nsb, 128)
    return np.concatenate([_half_bytes(d), _half_bytes(dmin), scales, qs], axis=-1).reshape(rows, -1)


def unpack_blocks(data: np.ndarray, qtype: str, n: int) -> dict:
    """The fields of packed rows ``data`` (uint8 ``[rows, bytes]``) of ``n`` weights each: ``codes``
    (int8 for Q8_0, the nibbles otherwise), ``d`` (float32) and for Q4_K ``dmin``, ``sc``, ``m``."""
    size, per = BYTES_PER_BLOCK[qtype]
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(rows, n // per, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == "Q8_0":
        return {"codes": blocks[..., 2:].copy().view(np.int8).reshape(rows, n), "d": d}
    if qtype == "Q4_0":
        qs = blocks[..., 2:]
        nib = np.stack([qs & 15, qs >> 4], axis=2).reshape(rows, n)
        return {"codes": nib, "d": d}
    if qtype == "Q5_0":
        qh = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")
        qs = blocks[..., 6:]
        low = np.stack([qs & 15, qs >> 4], axis=2).reshape(rows, n // per, per)
        return {"codes": (low | (qh << 4)).reshape(rows, n), "d": d}
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    s = blocks[..., 4:16]
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:].reshape(rows, n // per, 4, 1, 32)
    nib = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(rows, n)
    return {"codes": nib, "d": d, "dmin": dmin, "sc": sc.reshape(rows, -1), "m": m.reshape(rows, -1)}


def _grouped_32(qt: QTensor) -> bool:
    g = qt.spec.granularity
    return (len(qt.shape) == 2 and isinstance(g, PerGroup) and g.size == BLOCK and g.axis in (-1, 1)
            and qt.shape[1] % BLOCK == 0)


def _gcd_rows(p: torch.Tensor) -> torch.Tensor:
    """gcd along the last axis of a non-negative int64 tensor (gcd(0, x) = x; all zeros -> 1)."""
    g = p[..., 0].clone()
    for j in range(1, p.shape[-1]):
        g = torch.gcd(g, p[..., j])
    return torch.where(g > 0, g, torch.ones_like(g))


def _q4_k(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int):
    """Q4_K fields for codes ``q`` on ``w = (q - zp) * scale`` or a reason why not."""
    rows, n = q.shape
    if n % SUPER_BLOCK:
        return f"rows of {n} weights are not a multiple of {SUPER_BLOCK}"
    if qmax - qmin > 15:
        return "codes span more than 16 levels"
    dec = q4_k_decompose(scale)
    if dec is None:
        return "scales are not fp16 d times a 6-bit integer per super-block (use the gguf-q4_k recipe)"
    d, sc = dec
    k = (zp.to(torch.int64) - qmin)                                  # w = s * (u - k), u = q - qmin in [0, 15]
    p = (sc * k).reshape(rows, -1, 8)                               # dmin * m_j = d * sc_j * k_j = d * p_j
    full = _gcd_rows(p)
    pow2 = full & -full                                             # largest power-of-two divisor: d*g exact
    bad = ((p // pow2.unsqueeze(-1)) > 63).any(-1) | ~fp16_exact(d * pow2.float())
    g = torch.where(bad, full, pow2)                                # else the whole gcd (smallest mins)
    m = p // g.unsqueeze(-1)
    dmin = d * g.float()
    if bool((m > 63).any()) or not bool(fp16_exact(dmin).all()):
        return "zero points do not give 6-bit mins with an fp16 dmin"
    nib = (q.to(torch.int64) - qmin).numpy()
    return pack_q4_k(nib, d.numpy(), dmin.numpy(), sc.numpy(), m.reshape(rows, -1).numpy())


def gguf_blocks(qt: QTensor, prefer: tuple[str, ...] = ("Q4_K", "Q4_0", "Q5_0", "Q8_0")) -> tuple[str, np.ndarray] | tuple[None, str]:
    """``(type, packed uint8 [rows, bytes])`` for the first type of ``prefer`` that holds ``qt``
    exactly, or ``(None, reason)``.

    Exact means: llama.cpp's dequantized float32 weights equal ``qt.dequantize()`` bit for bit.
    ``qt`` must be a 2-D PerGroup(32) tensor with fp16-exact scales (Q8_0: ``q - z`` in int8;
    Q4_0: ``q - z`` in [-8, 7]; Q5_0: in [-16, 15]) or, for Q4_K, scales ``d * sc_j`` (see :mod:`lowbit.ops.gguf_grid`).
    """
    if not _grouped_32(qt):
        return None, f"grid {qt.spec.granularity} on shape {tuple(qt.shape)} is not PerGroup(32) along rows"
    q = qt.int_repr().to(torch.int64).cpu()
    scale = qt.scale.detach().float().cpu()
    if qt.scale.dtype == torch.float64 and not bool((scale.double() == qt.scale.cpu()).all()):
        return None, "float64 scales that float32 does not hold"
    zp = qt.zero_point.to(torch.int64).cpu()
    rows, n = q.shape
    v = q - zp.repeat_interleave(BLOCK, dim=1)                      # w = v * s
    reasons = []
    for t in prefer:
        if t == "Q4_K":
            out = _q4_k(q, scale, zp, qt.spec.qmin, qt.spec.qmax)
            if isinstance(out, str):
                reasons.append(f"Q4_K: {out}")
                continue
            return t, out
        lo, hi = {"Q8_0": (-128, 127), "Q5_0": (-16, 15), "Q4_0": (-8, 7)}[t]
        if not bool(fp16_exact(scale).all()):
            reasons.append(f"{t}: scales are not fp16 numbers (use a gguf-* recipe)")
            continue
        if q.numel() and (int(v.min()) < lo or int(v.max()) > hi):
            reasons.append(f"{t}: codes minus zero point leave [{lo}, {hi}]")
            continue
        if t == "Q8_0":
            return t, pack_q8_0(v.numpy(), scale.numpy())
        if t == "Q5_0":
            return t, pack_q5_0((v + 16).numpy(), scale.numpy())
        return t, pack_q4_0((v + 8).numpy(), scale.numpy())
    return None, "; ".join(reasons)


def row_bytes(qtype: str, n: int) -> int:
    size, per = BYTES_PER_BLOCK[qtype]
    return size * math.ceil(n / per)
