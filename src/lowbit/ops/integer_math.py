"""Integer arithmetic of quantized inference: exact GEMM, fixed-point multipliers, requantization.

A quantized Linear/Conv computes, with input codes ``q_x`` (zero point ``z_x``, scale ``s_x``)
and weight codes ``q_w`` (``z_w``, ``s_w``), the exact integer accumulator::

    acc = sum_k (q_x[k] - z_x) * (q_w[k] - z_w)  +  bias_int,     bias_int = round(b / (s_x * s_w))

whose real value is ``acc * s_x * s_w``. To hand the result to a layer that reads a grid
``(s_out, z_out)`` it is *requantized*::

    q_out = clamp(round(acc * M) + z_out, qmin, qmax),      M = s_x * s_w / s_out

with ``M`` held as an integer mantissa and a shift (:func:`quantize_multiplier`), so only
integer operations run (Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", section 2.2; gemmlowp's output stages).

:func:`requantize` rounds **once**: ``round(acc * mantissa / 2^shift)`` is computed from the
exact 64-bit product, so it equals the exact rational rounding of ``acc * mantissa * 2^-shift``.
``rounding="half_even"`` (default) breaks ties to even like ONNX QuantizeLinear and
``torch.round``; ``"half_away"`` breaks them away from zero (TFLite's single-rounding build).
``rounding="gemmlowp"`` reproduces gemmlowp / the TFLite reference kernel bit for bit:
``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc, mantissa), shift - 31)``, which
rounds twice (each half away from zero) and can differ from the exact rounding by one code.
"""
from __future__ import annotations

import logging

import torch

__all__ = ["quantize_multiplier", "requantize", "rounding_shift", "int_matmul", "REQUANT_ROUNDING",
           "MANTISSA_BITS"]

REQUANT_ROUNDING = ("half_even", "half_away", "gemmlowp")
log = logging.getLogger(__name__)

MANTISSA_BITS = 31          # mantissa in [2^30, 2^31): a positive int32, as gemmlowp/TFLite
_MAX_SHIFT = 62             # |acc * mantissa| < 2^62, so any shift >= 63 rounds to 0


def quantize_multiplier(multiplier: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a real multiplier ``0 < M < 2^31`` into ``(mantissa, shift)`` with ``M ~ mantissa / 2^shift``.

    ``M = m * 2^e`` with ``m`` in ``[0.5, 1)`` (``frexp``); ``mantissa = round(m * 2^31)`` in
    ``[2^30, 2^31)`` and ``shift = 31 - e >= 0``. The relative error is at most ``2^-31``.
    Works elementwise on a tensor (per-channel multipliers); returns two int64 tensors.
    """
    m = torch.as_tensor(multiplier, dtype=torch.float64)
    if m.is_complex() or not bool(torch.isfinite(m).all()) or not bool((m > 0).all()):
        raise ValueError("multiplier must be finite and > 0 (it is s_x * s_w / s_out)")
    if bool((m >= 2.0 ** MANTISSA_BITS).any()):
        raise ValueError(f"multiplier must be < 2^{MANTISSA_BITS}, got {float(m.max()):g}; "
                         "the output scale is implausibly small for this layer")
    frac, exp = torch.frexp(m)
    mantissa = torch.round(frac * 2.0 ** MANTISSA_BITS).to(torch.int64)
    carry = mantissa == (1 << MANTISSA_BITS)     # frac rounded up to 1.0
    mantissa = torch.where(carry, mantissa >> 1, mantissa)
    exp = exp.to(torch.int64) + carry.to(torch.int64)
    return mantissa, MANTISSA_BITS - exp


def rounding_shift(p: torch.Tensor, shift: torch.Tensor, rounding: str = "half_even") -> torch.Tensor:
    """``round(p / 2^shift)`` for int64 ``p`` with ``|p| < 2^62`` and ``shift >= 0``, rounded once.

    ``rounding`` is ``"half_even"`` or ``"half_away"`` (how ties are broken).
    """
    shift = torch.as_tensor(shift, dtype=torch.int64, device=p.device)
    s = shift.clamp(0, _MAX_SHIFT)
    floor = torch.bitwise_right_shift(p, s)                      # arithmetic shift: floor division
    rem = p - torch.bitwise_left_shift(floor, s)                 # in [0, 2^s)
    one = torch.ones_like(s)
    half = torch.where(s > 0, torch.bitwise_left_shift(one, (s - 1).clamp_min(0)), one)  # s = 0: no tie
    if rounding == "half_even":
        tie_up = (floor & 1) == 1
    elif rounding == "half_away":
        tie_up = p >= 0
    else:
        raise ValueError(f"rounding must be 'half_even' or 'half_away', got {rounding!r}")
    up = (rem > half) | ((rem == half) & (s > 0) & tie_up)
    out = floor + up.to(torch.int64)
    return torch.where(shift > _MAX_SHIFT, torch.zeros_like(out), out)


def _gemmlowp(acc: torch.Tensor, mantissa: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """TFLite ``MultiplyByQuantizedMultiplier`` (reference, double rounding) in int64 arithmetic."""
    exponent = MANTISSA_BITS - shift                             # TFLite's "shift": M = mantissa/2^31 * 2^exponent
    left = exponent.clamp_min(0)
    right = (-exponent).clamp(0, _MAX_SHIFT)
    x = torch.bitwise_left_shift(acc, left).clamp(-(1 << 31), (1 << 31) - 1)
    # SaturatingRoundingDoublingHighMul(x, mantissa): (x * m + nudge) / 2^31, truncating toward zero
    ab = x * mantissa
    nudge = torch.where(ab >= 0, torch.full_like(ab, 1 << 30), torch.full_like(ab, 1 - (1 << 30)))
    high = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    # RoundingDivideByPOT(high, right): round half away from zero
    one = torch.ones_like(right)
    mask = torch.bitwise_left_shift(one, right) - 1
    remainder = high & mask
    threshold = (mask >> 1) + (high < 0).to(torch.int64)
    return torch.bitwise_right_shift(high, right) + (remainder > threshold).to(torch.int64)


def requantize(acc: torch.Tensor, mantissa: torch.Tensor, shift: torch.Tensor, zero_point, qmin: int, qmax: int,
               rounding: str = "half_even") -> torch.Tensor:
    """``clamp(round(acc * mantissa / 2^shift) + zero_point, qmin, qmax)`` in integer arithmetic.

    Args:
        acc: integer accumulator; its values must fit int32 (the 64-bit product is then exact).
        mantissa, shift: from :func:`quantize_multiplier`, broadcastable against ``acc``
            (one per output channel, for per-channel weights).
        zero_point: output zero point (int or integer tensor).
        rounding: ``"half_even"``, ``"half_away"`` (both exact single rounding) or ``"gemmlowp"``.

    Returns an int32 tensor of codes.
    """
    if acc.is_floating_point() or acc.is_complex():
        raise TypeError(f"acc must be an integer tensor, got {acc.dtype}")
    if rounding not in REQUANT_ROUNDING:
        raise ValueError(f"rounding must be one of {REQUANT_ROUNDING}, got {rounding!r}")
    a = acc.to(torch.int64)
    if a.numel() and (int(a.min()) < -(1 << 31) or int(a.max()) >= (1 << 31)):
        raise ValueError("acc must fit int32 for exact requantization; accumulate fewer terms or use wider scales")
    mantissa = torch.as_tensor(mantissa, dtype=torch.int64, device=a.device)
    shift = torch.as_tensor(shift, dtype=torch.int64, device=a.device)
    if rounding == "gemmlowp":
        r = _gemmlowp(a, mantissa, shift)
    else:
        r = rounding_shift(a * mantissa, shift, rounding)
    z = torch.as_tensor(zero_point, dtype=torch.int64, device=a.device)
    return torch.clamp(r + z, qmin, qmax).to(torch.int32)


def _int_mm_works(device: torch.device) -> bool:
    """Whether ``torch._int_mm`` runs here and is exact, probed once per device type with operands
    that overflow an int16 pair sum (``VPMADDUBSW``-style kernels on CPUs without VNNI would
    saturate them); if not, :func:`int_matmul` uses the plain integer matmul and says so once."""
    key = device.type
    if key not in _INT_MM:
        try:
            a = torch.full((2, 64), -128, dtype=torch.int8, device=device)
            a[1] = 127
            b = torch.full((64, 3), -128, dtype=torch.int8, device=device)
            b[:, 1] = 127
            b[:, 2] = 1
            exact = a.to(torch.int64) @ b.to(torch.int64) if device.type == "cpu" else None
            got = torch._int_mm(a, b)
            ok = bool(got.eq(exact).all()) if exact is not None else bool(got.cpu().eq(
                a.cpu().to(torch.int64) @ b.cpu().to(torch.int64)).all())
            if not ok:
                log.warning("lowbit: torch._int_mm is not exact on this %s (int16 saturation?); integer GEMMs "
                            "use torch's int32 matmul instead (correct, slower)", key)
            _INT_MM[key] = ok
        except (RuntimeError, AttributeError, NotImplementedError):
            _INT_MM[key] = False
    return _INT_MM[key]


_INT_MM: dict[str, bool] = {}


def int_matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Exact integer matrix product ``a @ b`` (2-D, or 3-D batched) with ``out_dtype`` accumulation.

    On CPU, int8 x int8 -> int32 uses ``torch._int_mm`` (oneDNN, VNNI/AMX: by far the fastest
    exact GEMM, see ``benchmarks/bench_integer.py``), otherwise torch's integer matmul in
    ``out_dtype``. Other devices multiply in float64, which is exact below 2^53. The caller guarantees that no partial
    sum overflows ``out_dtype`` (int32 holds ``K * 128 * 128`` for ``K < 131072``).
    """
    if a.is_floating_point() or b.is_floating_point():
        raise TypeError(f"int_matmul takes integer tensors, got {a.dtype} and {b.dtype}")
    if a.dim() != b.dim() or a.dim() not in (2, 3):
        raise ValueError(f"int_matmul takes two 2-D or two 3-D tensors, got shapes {tuple(a.shape)}, {tuple(b.shape)}")
    fast = (out_dtype == torch.int32 and a.dtype == torch.int8 and b.dtype == torch.int8
            and a.device.type == "cpu" and _int_mm_works(a.device))
    if fast:
        if a.dim() == 2:
            return torch._int_mm(a, b)
        return torch.stack([torch._int_mm(a[i], b[i]) for i in range(a.shape[0])])
    if a.device.type != "cpu":
        # CUDA has no integer matmul; float64 is exact while every partial sum stays below 2^53
        # (always, for sums that fit int32)
        a, b = a.to(torch.float64), b.to(torch.float64)
        return (a @ b if a.dim() == 2 else torch.bmm(a, b)).to(out_dtype)
    a, b = a.to(out_dtype), b.to(out_dtype)
    return a @ b if a.dim() == 2 else torch.bmm(a, b)
