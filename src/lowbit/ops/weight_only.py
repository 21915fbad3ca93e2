"""Weight-only matrix products on integer weights: the kernels a frozen linear layer runs.

For ``y = x W^T`` with ``W = (q - z) * s`` (codes ``q`` per output row, one scale ``s`` and zero
point ``z`` per group of ``G`` inputs, or per row), three ways are offered:

* ``"dequantize"`` (always available, the reference): rebuild ``W`` for this call only, in the
  input's dtype, and run ``F.linear``. Exact up to float rounding; reads the codes, writes and reads
  a float copy of ``W`` (transient: nothing is kept between calls).
* ``"int4"``: PyTorch's CPU kernel ``aten._weight_int4pack_mm_for_cpu`` (shipped with torch; what
  torchao's int4 weight-only layout runs on CPU). Codes of up to 4 bits are held as *offset* nibbles
  ``u = q + c`` (``c = 8`` for signed codes, 0 for unsigned ones) in the kernel's tiled layout
  (:func:`int4_tiles`), with per group a bfloat16 pair ``(s, (8 - c - z) * s)`` so that
  ``W = (q - z) * s = (u - 8) * s + (8 - c - z) * s``. The product is
  computed with bfloat16 activations and float32 accumulation.
* ``"int8"``: ``aten._weight_int8pack_mm`` (int8 codes, one scale per output row), bfloat16
  activations, float32 accumulation; a zero point is compensated exactly as ``s * z * sum(x)``.

The int kernels read 0.5 (int4) or 1 (int8) byte per weight instead of 4: at batch 1 (token by
token decoding) that is the whole cost. Their price is the bfloat16 rounding of the activations
(relative 2^-9 per element) and, for int4, of the per-group scales (2^-9 of a step): the output
differs from the dequantize path by at most about ``2^-8 * sum_k |w_k x_k|`` per output, well under
the quantization error of the weights themselves. ``lowbit.modules`` picks the kernel per layer
(:func:`int4_supported`, :func:`int8_supported`); :func:`kernel_works` checks once per process that
the kernel exists and computes what the reference computes on this CPU, and says so when it falls
back.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

__all__ = ["int4_tiles", "int4_untile", "int4_pair_table", "int4_mm", "int8_mm", "int4_supported",
           "int8_supported", "kernel_works", "onnx_to_int4_tiles", "int4_tiles_to_onnx", "INT4_GROUP_SIZES", "INT4_TILE"]

log = logging.getLogger(__name__)

INT4_TILE = 64                      # rows per tile of aten's CPU int4 layout
INT4_GROUP_SIZES = (32, 64, 128, 256)


def int4_tiles(u: torch.Tensor) -> torch.Tensor:
    """Pack offset nibbles ``u`` (``[N, K]`` integers in ``[0, 15]``, ``N % 64 == 0``) into the
    layout of ``aten._convert_weight_to_int4pack_for_cpu``: ``[N/64, K, 32]`` bytes, byte
    ``(t, k, d) = u[64 t + d, k] | u[64 t + d + 32, k] << 4``, viewed ``[N, K/2]``.

    Pure tensor ops (so it runs on any device, ``meta`` included); :func:`kernel_works` checks
    that it equals aten's packing on this build.
    """
    n, k = u.shape
    v = u.to(torch.uint8).reshape(n // INT4_TILE, INT4_TILE, k).transpose(1, 2)   # [T, K, 64]
    half = INT4_TILE // 2
    return (v[..., :half] | (v[..., half:] << 4)).contiguous().reshape(n, k // 2)


def int4_untile(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`int4_tiles`: the ``[N, K]`` offset nibbles (uint8)."""
    n = packed.shape[0]
    v = packed.reshape(n // INT4_TILE, k, INT4_TILE // 2)
    both = torch.cat((v & 15, v >> 4), dim=2)                                     # [T, K, 64]
    return both.transpose(1, 2).reshape(n, k)


def onnx_to_int4_tiles(packed: torch.Tensor, n: int, k: int, signed: bool) -> torch.Tensor:
    """lowbit's stored 4-bit codes (ONNX layout: row-major, two per byte, low nibble first, two's
    complement if ``signed``) straight to :func:`int4_tiles` of the offset nibbles ``u = q + 8``
    (signed) or ``u = q`` (unsigned), in uint8 arithmetic (temporaries of about 1 MiB at a time)."""
    src = packed.reshape(n, k // 2)
    out = torch.empty(n, k // 2, dtype=torch.uint8, device=packed.device)
    rows = max(INT4_TILE, (1 << 20) // max(k, 1) // INT4_TILE * INT4_TILE)   # ~1 MiB of temporaries at a time
    for r in range(0, n, rows):
        b = src[r:r + rows]
        if signed:
            b = b ^ 0x88                  # q & 15 -> (q + 8) & 15 in both nibbles
        u = torch.stack((b & 15, b >> 4), dim=-1).reshape(b.shape[0], k)
        out[r:r + rows] = int4_tiles(u)
    return out


def int4_tiles_to_onnx(tiles: torch.Tensor, n: int, k: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`onnx_to_int4_tiles`: the stored (ONNX) bytes, flat."""
    u = int4_untile(tiles.reshape(n, k // 2), k).reshape(n, k // 2, 2)
    b = u[..., 0] | (u[..., 1] << 4)
    return (b ^ 0x88 if signed else b).reshape(-1)


def int4_pair_table(scale: torch.Tensor, zero_point: torch.Tensor, code_offset: int,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The kernel's ``scales_and_zeros``, ``[K/G, N, 2]``: per group ``(s, (8 - c - z) * s)``.

    ``scale``/``zero_point`` are ``[N, K/G]`` (lowbit's PerGroup shape); ``code_offset`` is ``c``,
    the shift that made the codes non-negative (8 for signed codes, 0 for unsigned ones).
    """
    s = scale.to(torch.float32)
    offset = (8 - code_offset - zero_point.to(torch.float32)) * s
    return torch.stack((s, offset), dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, pairs: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x @ W^T`` with aten's CPU int4 kernel (bfloat16 activations); output in ``x``'s dtype."""
    shape = x.shape
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(pairs.dtype), packed,
                                                   group_size, pairs)
    return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


def int8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
            zero_term: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ ((q - z) s)^T`` with aten's int8 kernel: ``(x_bf16 @ q^T) * s  -  sum(x) * (s z)``.

    ``scale`` is ``[N]`` in bfloat16; ``zero_term`` is ``s * z`` (float32, ``[N]``) or None.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    y = torch.ops.aten._weight_int8pack_mm(x2.to(scale.dtype), codes, scale).to(x.dtype)
    if zero_term is not None:
        y = y - x2.sum(dim=1, keepdim=True) * zero_term.to(x.dtype)
    return y.reshape(*shape[:-1], y.shape[-1])


def int4_supported(out_features: int, in_features: int, group_size: int, device: torch.device) -> bool:
    """Whether the int4 kernel takes this shape: CPU, ``N % 64 == 0``, a group size it knows."""
    return (device.type == "cpu" and out_features % INT4_TILE == 0 and group_size in INT4_GROUP_SIZES
            and in_features % group_size == 0 and kernel_works("int4"))


def int8_supported(in_features: int, device: torch.device) -> bool:
    """Whether the int8 kernel takes this layer: CPU, ``in_features % 32 == 0`` (aten's kernel reads
    past the row otherwise: it crashed on 8 and 20 inputs in torch 2.13), and it computes what the
    reference computes."""
    return device.type == "cpu" and in_features % 32 == 0 and kernel_works("int8")


@functools.lru_cache(maxsize=None)
def kernel_works(name: str) -> bool:
    """Check once per process that kernel ``name`` (``"int4"`` or ``"int8"``) exists in this torch
    build and agrees with the dequantize reference on a probe; log (once) and return False if not."""
    gen = torch.Generator().manual_seed(0)
    n, k, g = 128, 256, 64
    x = torch.randn(3, k, generator=gen)
    try:
        if name == "int4":
            u = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
            if not torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1), int4_tiles(u)):
                raise RuntimeError("aten's int4 layout differs from lowbit's int4_tiles")
            s = torch.rand(n, k // g, generator=gen) + 0.5
            z = torch.randint(0, 16, (n, k // g), generator=gen)
            pairs = int4_pair_table(s, z, 0)
            got = int4_mm(x, int4_tiles(u), pairs, g)
            w = (u.float() - z.repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)
        elif name == "int8":
            q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
            s = torch.rand(n, generator=gen) + 0.5
            got = int8_mm(x, q, s.to(torch.bfloat16))
            w = q.float() * s.to(torch.bfloat16).float()[:, None]
        else:
            raise ValueError(f"unknown kernel {name!r}")
        want = F.linear(x.to(torch.bfloat16).float(), w)
        tol = 2.0 ** -6 * (x.abs() @ w.abs().t())
        if not bool(((got - want).abs() <= tol + 1e-6).all()):
            raise RuntimeError("it disagrees with the dequantize reference on a probe")
    except Exception as e:  # noqa: BLE001 - any failure means: use the reference path
        log.warning("lowbit: the %s weight-only kernel is not usable here (%s: %s); frozen layers "
                    "dequantize per call instead (same numbers, slower)", name, type(e).__name__, e)
        return False
    return True
