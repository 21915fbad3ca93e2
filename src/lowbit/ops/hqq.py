"""HQQ: a data-free weight grid that minimises an ``l_p`` (``p < 1``) norm of the weight error.

Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning Models". For one row
``w`` (the weights sharing a scale) and the grid ``Q(w) = clamp(round(w / s) + z, qmin, qmax)``,
``w^ = s (Q(w) - z)``, HQQ minimises the robust error ``phi(w - w^) = sum |w - w^|^p``. The
non-convex problem is split by half-quadratic splitting with an auxiliary error ``e``::

    min_{s, z, e}  phi(e) + beta/2 ||e - (w - w^)||^2

and solved by alternating closed-form steps, ``beta <- kappa * beta`` each time:

    e  = shrink_p(w - w^, beta) = sign(r) * max(|r| - |r|^(p-1) / beta, 0)     (generalized soft threshold)
    (s, z) = argmin ||(w - e) - s (Q - z)||^2 with Q fixed                       (least squares)

Small errors (rounding) are thresholded to zero and fitted by least squares; large ones
(outliers the grid clips) go into ``e`` and stop pulling the grid. The paper's update is the
zero-point step ``z = mean(Q - (w - e) / s)``; lowbit also updates the scale (the joint least
squares fit of the line ``s (Q - z)``; with a symmetric grid ``z`` is fixed and only ``s`` moves)
because of the integer constraint below.

Differences from the reference implementation, all forced by lowbit's grid (ONNX QuantizeLinear):

* The zero point must be an integer. HQQ's float zero point shifts the grid by a fraction of a
  step, which an integer one cannot express; lowbit rounds ``z`` after every update (so each
  iterate is a representable grid), and keeps, per row, the iterate (the min-max start included)
  with the smallest ``phi``. So the result is never worse than min-max in ``phi``. Because a
  rounded ``z`` rarely moves, the scale update carries most of the improvement.
* A range method returns ``[lo, hi]`` per row, not ``(s, z)``. The returned range is
  ``lo = s (qmin - z)``, ``hi = s (qmax - z)`` (symmetric: ``+-s (qmax - z0)``), which
  :func:`lowbit.ops.range_to_qparams` maps back to the same ``(s, z)`` (up to float rounding of ``s``).
* The threshold of ``shrink_p`` depends on the units of ``r``; the reference applies it to raw
  weights, so its behaviour changes with the weights' magnitude. lowbit measures errors in steps of
  the starting grid (``w / s0``), which makes ``beta`` scale-free.

Use it as ``ops.choose_qparams(w, spec, observer="hqq")`` or ``lb.quantize(...,
weight_observer="hqq")``.
"""
from __future__ import annotations

import torch

from ..spec import QuantSpec
from .qparams import finite_minmax, range_to_qparams, register_range_method

__all__ = ["hqq_range", "shrink_lp"]

def shrink_lp(r: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding, the proximal step of ``|r|^p`` (``p = 1``: soft threshold)."""
    a = r.abs()
    if p == 1:
        return torch.sign(r) * torch.relu(a - 1.0 / beta)
    return torch.sign(r) * torch.relu(a - torch.pow(a + 1e-8, p - 1.0) / beta)


def hqq_range(rows: torch.Tensor, spec: QuantSpec, *, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
              iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``[lo, hi]`` whose grid minimises ``sum |w - w^|^p``; see the module docstring.

    Stops early once an iteration improves no row's ``phi``.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 2:
        raise ValueError(f"hqq: p must be in (0, 2] (HQQ uses 0.7), got {p!r}")
    if not beta > 0 or not kappa >= 1:
        raise ValueError(f"hqq: need beta > 0 and kappa >= 1, got beta={beta}, kappa={kappa}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"hqq: iters must be an int >= 0, got {iters!r}")
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    lo0, hi0 = finite_minmax(rows)
    s0, z0 = range_to_qparams(lo0, hi0, spec)  # the min-max (symmetric: max-abs) start
    s0 = s0.to(dtype)
    mask = torch.isfinite(rows)
    full = bool(mask.all())
    v = rows.to(dtype) / s0[:, None]  # errors in steps of the starting grid: beta is scale-free
    if not full:
        v = torch.where(mask, v, torch.zeros((), dtype=dtype))
    fmask = None if full else mask.to(dtype)
    count = torch.full_like(s0, rows.shape[1]) if full else fmask.sum(dim=1).clamp_min(1)
    qmin, qmax = float(spec.qmin), float(spec.qmax)

    s = torch.ones_like(s0)
    z = z0.to(dtype)
    best_s, best_z, best_err = s, z, None
    for _ in range(iters + 1):
        q = torch.clamp(torch.round(v / s[:, None]) + z[:, None], qmin, qmax)
        r = v - s[:, None] * (q - z[:, None])  # the error on the representable (integer zero) grid
        a = r.abs()
        a_pm1 = torch.pow(a + 1e-8, p - 1.0)
        phi = a * a_pm1 if fmask is None else a * a_pm1 * fmask
        err = phi.sum(dim=1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            if not bool(better.any()):
                break
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
            best_err = torch.minimum(err, best_err)
        t = v - torch.sign(r) * torch.relu(a - a_pm1 / beta)  # w - e, with e = shrink_p(r, beta)
        beta *= kappa
        if fmask is not None:
            q, t = q * fmask, t * fmask
        if spec.symmetric:  # s = <t, Q - z> / ||Q - z||^2, z fixed
            c = q - z[:, None] if fmask is None else (q - z[:, None]) * fmask
            den = (c * c).sum(dim=1)
            s_new = (c * t).sum(dim=1) / den.clamp_min(1e-30)
            ok = (den > 0) & (s_new > 0) & torch.isfinite(s_new)
            s = torch.where(ok, s_new, s)
        else:  # least squares line t ~ s (Q - z): slope s, then z = mean(Q) - mean(t) / s, rounded
            mq, mt = q.sum(dim=1) / count, t.sum(dim=1) / count
            cov = (q * t).sum(dim=1) / count - mq * mt
            var = (q * q).sum(dim=1) / count - mq * mq
            s_new = cov / var.clamp_min(1e-30)
            ok = (var > 1e-12) & (s_new > 0) & torch.isfinite(s_new)
            s = torch.where(ok, s_new, s)
            z = torch.where(ok, torch.clamp(torch.round(mq - mt / s), qmin, qmax), z)
    scale = best_s * s0
    if spec.symmetric:
        r = scale * (qmax - spec.symmetric_zero_point)
        lo, hi = -r, r
    else:
        lo, hi = scale * (qmin - best_z), scale * (qmax - best_z)
    keep = (lo0 == hi0) | ~torch.isfinite(lo) | ~torch.isfinite(hi)  # degenerate rows: the min-max range
    return (torch.where(keep, lo0.to(dtype), lo).to(rows.dtype), torch.where(keep, hi0.to(dtype), hi).to(rows.dtype))


register_range_method("hqq", hqq_range)
