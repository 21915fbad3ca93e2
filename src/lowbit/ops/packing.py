"""Bit packing of small integer codes into bytes.

Codes of ``bits <= 4`` are stored two per byte and codes of ``bits <= 2`` four per byte, in the
layout of ONNX's INT4/UINT4 (and INT2/UINT2) tensors: element ``i`` of the flattened tensor sits
in bits ``[k*(i % per_byte), k*(i % per_byte) + k)`` of byte ``i // per_byte`` (low bits first),
as two's complement for signed codes. 3-bit codes use the 4-bit container.
"""
from __future__ import annotations

import torch

__all__ = ["container_bits", "pack", "unpack", "packed_numel"]


def container_bits(bits: int) -> int:
    """Bits per stored code: 2, 4 or 8 (16 for wider grids, which are not packed)."""
    if bits <= 2:
        return 2
    if bits <= 4:
        return 4
    return 8 if bits <= 8 else 16


def packed_numel(numel: int, bits: int) -> int:
    """Number of bytes that hold ``numel`` packed codes."""
    per_byte = 8 // container_bits(bits)
    return -(-numel // per_byte)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, values fitting ``bits``) into a flat uint8 tensor.

    Works in bytes: the codes' low 8 bits (integer casts wrap, so negative codes become their
    two's complement), masked to ``k`` bits and OR-ed into place; temporaries of at most one byte
    per code (a 32000 x 3200 weight's codes pack with ~0.2 GB, not ~2 GB of int32/int64 scratch).
    """
    k = container_bits(bits)
    if k >= 8:
        raise ValueError(f"pack is for codes of at most 4 bits, got bits={bits}")
    per_byte = 8 // k
    mask = (1 << k) - 1
    flat = q.reshape(-1)
    if flat.is_floating_point():
        flat = flat.to(torch.int32)   # truncated toward zero, as before
    if flat.dtype != torch.uint8:
        flat = flat.to(torch.uint8)   # low 8 bits (two's complement for negative codes)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    flat = flat.reshape(-1, per_byte)
    out = flat[:, 0] & mask
    for i in range(1, per_byte):
        out |= (flat[:, i] & mask) << (k * i)
    return out


def unpack(packed: torch.Tensor, bits: int, numel: int, signed: bool, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a flat tensor of ``dtype``.

    Works in bytes, as :func:`pack` does: each field shifted down and masked in uint8; signed codes
    are sign-extended by shifting the field to the top of an int8 and back (arithmetic shift).
    """
    k = container_bits(bits)
    shifts = torch.arange(0, 8, k, device=packed.device, dtype=torch.uint8)
    codes = ((packed.to(torch.uint8).unsqueeze(1) >> shifts) & ((1 << k) - 1)).reshape(-1)[:numel]
    if signed:
        codes = (codes << (8 - k)).view(torch.int8) >> (8 - k)
    return codes.to(dtype)
