"""MSE-optimal clipping: the scale that minimises the squared quantization error, per row.

The zero point is fixed first (0 / the grid's middle for symmetric grids; for affine grids the
zero point of the full ``[min, max]`` range, which shrinking the range by a common factor leaves
unchanged), so every row has one free parameter, the scale ``s``, with ``P = qmax - z`` steps above
zero and ``N = z - qmin`` below. For data ``x`` the error is

    E(s) = sum_i (x_i - s k_i(s))^2,     k_i(s) = clamp(round(x_i / s), -N, P).

Two searches, both vectorised over rows (no Python loop over channels):

* :func:`mse_scale_exact` (small rows): ``k(s)`` is piecewise constant in ``s``; it changes at the
  breakpoints ``s = |x_i| / (j + 1/2)``. Inside a piece ``E`` is the quadratic
  ``sum x^2 - 2 s sum(x k) + s^2 sum(k^2)``, minimised at ``s* = sum(x k) / sum(k^2)`` clipped to
  the piece. Sorting the breakpoints and accumulating ``sum(x k)``, ``sum(k^2)`` gives the
  *global* minimum exactly (no grid can beat it), in ``O(n P log(n P))`` per row.
* :func:`mse_scale_histogram` (large rows, streaming): the error of a candidate is modelled from a
  histogram (bin masses at bin centres) with prefix sums, in ``O(bins + candidates)`` per row:
  clipped mass contributes ``(|x| - clip)^2`` exactly, mass that rounds to zero (``|x| < s/2``)
  contributes ``x^2``, and the rest the uniform rounding noise ``s^2 / 12`` (Widrow's model; the
  split into clipping and rounding noise as in Banner et al., "Post-training 4-bit quantization
  of convolution networks for rapid-deployment", NeurIPS 2019). A coarse grid of ``s`` is
  zoomed in twice around its best point (32 + 17 + 17 candidates, resolution 1/2048 of the range).
"""
from __future__ import annotations

import torch

from ..spec import QuantSpec
from .histogram import span_of

__all__ = ["grid_limits", "mse_scale_exact", "mse_scale_histogram", "scale_to_range"]


def grid_limits(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Full-range scale, zero point and step counts ``(s_full, z, P, N)`` per row (float64)."""
    lo, hi = lo.to(torch.float64), hi.to(torch.float64)
    if spec.symmetric:
        z = torch.full_like(lo, float(spec.symmetric_zero_point))
        s_full = torch.maximum(lo.abs(), hi.abs()) / (spec.qmax - spec.symmetric_zero_point)
    else:
        lo0, hi0 = lo.clamp(max=0), hi.clamp(min=0)
        s_full = (hi0 - lo0) / (spec.qmax - spec.qmin)
        safe = torch.where(s_full > 0, s_full, torch.ones_like(s_full))
        z = torch.clamp(spec.qmin - torch.round(lo0 / safe), spec.qmin, spec.qmax)
    return s_full, z, spec.qmax - z, z - spec.qmin


def scale_to_range(s: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The range ``[s (qmin - z), s (qmax - z)]`` that :func:`range_to_qparams` maps back to ``(s, z)``."""
    if spec.symmetric:
        r = s * (spec.qmax - spec.symmetric_zero_point)
        return -r, r
    return s * (spec.qmin - z), s * (spec.qmax - z)


def mse_scale_exact(rows: torch.Tensor, z: torch.Tensor, pos_steps: torch.Tensor,
                    neg_steps: torch.Tensor) -> torch.Tensor:
    """The globally MSE-optimal scale per row (see the module docstring); non-finite values are
    ignored. Rows without a non-zero finite value get ``NaN``."""
    x = rows.to(torch.float64)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    r, n = x.shape
    limit = int(torch.maximum(pos_steps, neg_steps).max())
    j = torch.arange(limit, dtype=torch.float64, device=x.device)
    steps = torch.where(x >= 0, pos_steps[:, None], neg_steps[:, None])  # [r, n]
    valid = (j[None, None, :] < steps[:, :, None]) & (x[:, :, None] != 0)
    bp = torch.where(valid, x.abs()[:, :, None] / (j + 0.5), torch.zeros((), dtype=x.dtype, device=x.device))
    dxk = torch.where(valid, x.abs()[:, :, None].expand_as(bp), torch.zeros_like(bp))
    dk2 = torch.where(valid, (2 * j + 1).expand_as(bp), torch.zeros_like(bp))
    bp, order = bp.reshape(r, -1).sort(dim=1, descending=True)
    a = dxk.reshape(r, -1).gather(1, order).cumsum(dim=1)
    b = dk2.reshape(r, -1).gather(1, order).cumsum(dim=1)
    upper = bp  # piece p spans [bp[p+1], bp[p]] once breakpoint p is crossed
    lower = torch.cat([bp[:, 1:], torch.zeros(r, 1, dtype=x.dtype, device=x.device)], dim=1)
    s = torch.where(b > 0, a / b.clamp_min(1), upper)
    s = torch.minimum(torch.maximum(s, lower), upper)
    sx2 = x.square().sum(dim=1, keepdim=True)
    err = sx2 - 2 * s * a + s.square() * b
    err = torch.where((s > 0) & (b > 0), err, torch.full_like(err, float("inf")))
    best = err.argmin(dim=1, keepdim=True)
    out = s.gather(1, best).squeeze(1)
    return torch.where(torch.isfinite(err.gather(1, best).squeeze(1)), out, torch.full_like(out, float("nan")))


def _model_error(s, pos_steps, neg_steps, cum, span, bins):
    """Modelled error (unnormalised) for candidate scales ``s [rows, C]`` from prefix sums
    ``cum = (N, S1, S2)``, each ``[rows, bins + 1]``, of a histogram on ``[-span, span]``."""
    n_c, s1_c, s2_c = cum
    t = span[:, None]
    inv_w = torch.where(t > 0, bins / (2 * t).clamp_min(1e-300), torch.zeros_like(t))
    base = t * inv_w - 0.5

    def below(v):  # number of bin centres strictly below v
        return torch.ceil(v * inv_w + base).clamp_(0, bins).to(torch.int64)

    hi_clip = s * pos_steps[:, None]
    lo_clip = -s * neg_steps[:, None]
    k_hi, k_lo = below(hi_clip), below(lo_clip)
    k_z0 = torch.maximum(below(-0.5 * s), k_lo)
    k_z1 = torch.minimum(below(0.5 * s), k_hi)
    n_hi, n_lo = n_c.gather(1, k_hi), n_c.gather(1, k_lo)
    # clipped mass: sum n (c - h)^2 = S2 - 2 h S1 + h^2 N over each tail
    tn, t1, t2 = n_c[:, -1:] - n_hi, s1_c[:, -1:] - s1_c.gather(1, k_hi), s2_c[:, -1:] - s2_c.gather(1, k_hi)
    err = t2 - 2 * hi_clip * t1 + hi_clip.square() * tn
    err += s2_c.gather(1, k_lo) - 2 * lo_clip * s1_c.gather(1, k_lo) + lo_clip.square() * n_lo
    zero_n = (n_c.gather(1, k_z1) - n_c.gather(1, k_z0)).clamp_min(0)
    err += (s2_c.gather(1, k_z1) - s2_c.gather(1, k_z0)).clamp_min(0)
    return err + ((n_hi - n_lo) - zero_n).clamp_min(0) * s.square() / 12


def mse_scale_histogram(counts: torch.Tensor, exponent: torch.Tensor, s_full: torch.Tensor,
                        pos_steps: torch.Tensor, neg_steps: torch.Tensor,
                        candidates: int = 32, rounds: int = 3) -> torch.Tensor:
    """Modelled MSE-optimal scale per row from a histogram on ``[-2^e, 2^e]`` (see
    :mod:`lowbit.ops.histogram`), searched over ``s = a * s_full`` for ``a`` in ``(0, 1]``:
    ``candidates`` points, then ``rounds - 1`` zooms of 17 points around the best (each 8x finer)."""
    r, bins = counts.shape
    c = counts.to(torch.float64)
    span = span_of(exponent)
    dev = c.device
    w = 2 * span[:, None] / bins
    centres = -span[:, None] + (torch.arange(bins, dtype=torch.float64, device=dev) + 0.5) * w
    cum = torch.zeros(3, r, bins + 1, dtype=torch.float64, device=dev)
    torch.cumsum(c, dim=1, out=cum[0, :, 1:])
    m1 = c * centres
    torch.cumsum(m1, dim=1, out=cum[1, :, 1:])
    torch.cumsum(m1.mul_(centres), dim=1, out=cum[2, :, 1:])
    sf = s_full.to(torch.float64)[:, None]
    pf, nf = pos_steps.to(torch.float64), neg_steps.to(torch.float64)
    a = (torch.arange(1, candidates + 1, dtype=torch.float64, device=dev) / candidates).expand(r, -1)
    step = 1.0 / candidates
    offsets = torch.linspace(-1.0, 1.0, 17, dtype=torch.float64, device=dev)
    for round_ in range(rounds):
        err = _model_error(sf * a, pf, nf, cum, span, bins)
        best = a.gather(1, err.argmin(dim=1, keepdim=True))
        if round_ == rounds - 1:
            break
        a = (best + offsets * step).clamp(1e-6, 1.0)
        step /= 8
    return sf.squeeze(1) * best.squeeze(1)
