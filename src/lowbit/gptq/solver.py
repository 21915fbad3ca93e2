"""GPTQ's solver for one weight matrix: quantize column by column, compensating the rest.

Frantar, Ashkboos, Hoefler & Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (building on Optimal Brain Surgeon, Hassibi & Stork 1993, and
Optimal Brain Compression, Frantar & Alistarh 2022).

Problem. A layer computes ``y = W x`` with ``W`` of shape ``[rows, d]``; over calibration inputs
``X = [x_1 .. x_n]`` the output error of a quantized ``W^`` is::

    ||W X - W^ X||_F^2 = tr((W - W^) H (W - W^)^T) / 2,       H = 2 X X^T

Rows are independent and share ``H``. GPTQ quantizes the columns in one fixed order; when column
``q`` is rounded, the not-yet-quantized columns ``F`` absorb its error (the OBS update)::

    err   = (w_q - quant(w_q)) / [H_F^-1]_qq
    w_F  -= err * [H_F^-1]_{q, F}
    H_{F \\ q}^-1 = (H_F^-1 - H_F^-1[:, q] H_F^-1[q, :] / [H_F^-1]_qq) restricted to F \\ q

With a fixed order the rows of the successive downdated inverses are the rows of the upper
Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``): ``[H_F^-1]_{q, F} = U_qq U_{q, F}``, so the update
is ``w_F -= (w_q - quant(w_q)) / U_qq * U_{q, F}``. Updates are applied lazily: inside a block of
``block_size`` columns immediately, to the columns after the block once per block (one GEMM).

Numerics: ``H`` is damped by ``damp * mean(diag H)`` on the diagonal (retried with 10x more if
the Cholesky factorization fails); a *dead* input (``H_ii = 0``, never non-zero in calibration)
gets ``H_ii = 1``, which makes its column independent (plain rounding, no error spread). Unlike the
reference implementation, its weights are kept, not zeroed: calibration says nothing about them.

Grids. Per-tensor and per-channel grids are fitted once, to the original weights (with the
layer's range method). A per-group grid (``PerGroup(size)`` along the input dimension) is fitted
when its first column comes up, to the *current* (error-updated) weights of the group, as the
reference does (here exactly: pending in-block updates are included). With ``act_order`` (columns
in order of decreasing ``diag(H)``) the groups stay the contiguous groups of the natural order
("static groups"): every group's grid is fitted up front to the original weights.
"""
from __future__ import annotations

import logging

import torch

from .. import ops
from ..spec import PerChannel, PerGroup, PerTensor, QuantSpec

__all__ = ["solve", "check_spec", "inverse_hessian_factor"]

log = logging.getLogger(__name__)


def check_spec(spec: QuantSpec) -> None:
    """Raise ``ValueError`` unless GPTQ can use the grid of ``spec`` on a ``[rows, d]`` GEMM weight."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return
    if isinstance(g, PerChannel) and g.axis in (0, -2):
        return
    if isinstance(g, PerGroup) and g.axis in (1, -1):
        return
    raise ValueError(f"gptq: weight granularity {g!r} is not supported; GPTQ needs PerTensor(), PerChannel(0) "
                     "or PerGroup(size) along the input dimension (axis=-1)")


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (float64) and the ``lambda`` used.

    ``h`` must already have its dead diagonal entries set. ``lambda = damp * mean(diag H)``,
    multiplied by 10 (up to 6 times) while ``H + lambda I`` is not numerically positive definite.
    """
    h = h.to(torch.float64)
    d = h.shape[0]
    mean_diag = float(h.diagonal().mean())
    lam = damp * mean_diag
    eye = torch.eye(d, dtype=torch.float64, device=h.device)
    for _ in range(7):
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u, lam
        lam = max(lam * 10.0, 1e-6 * max(mean_diag, 1e-12))
        log.warning("gptq: Hessian not positive definite, retrying with damping %.3g", lam)
    raise ValueError("gptq: the input Hessian stays singular even with heavy damping; the calibration "
                     "inputs may contain inf/NaN, or pass a larger damp")


def _row_spec(spec: QuantSpec) -> QuantSpec:
    return spec.replace(granularity=PerChannel(0), rounding="nearest")


def _fit(w: torch.Tensor, spec: QuantSpec, observer: str, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.choose_qparams(w, spec, observer, **options)


def solve(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, observer: str = "minmax",
          observer_options: dict | None = None, *, damp: float = 0.01, block_size: int = 128,
          act_order: bool = False, grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Quantize ``w`` ``[rows, d]`` by GPTQ given ``h`` ``[d, d]`` (any positive multiple of ``X X^T``).

    Computes in ``w``'s dtype (float32 or float64); the grid comes from
    ``ops.choose_qparams(..., observer, **observer_options)``. Returns ``(w_q, scale, zero_point,
    lambda)``: ``w_q`` lies exactly on the grid (``ops.fake_quantize(w_q, spec, scale, zero_point)
    == w_q``) and the parameters have the ONNX shapes of ``spec`` for ``[rows, d]``. ``grid`` pins
    the ``(scale, zero_point)`` of a per-tensor or per-channel spec instead of fitting it.
    """
    check_spec(spec)
    options = dict(observer_options or {})
    spec = spec.replace(rounding="nearest")
    rows, d = w.shape
    dtype = w.dtype
    h = h.to(torch.float64).clone()
    diag = h.diagonal()
    dead = diag <= 0
    h[dead, dead] = 1.0
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    u, lam = inverse_hessian_factor(h, damp)
    u = u.to(dtype)

    grouped = isinstance(spec.granularity, PerGroup)
    size = spec.granularity.size if grouped else d
    n_groups = -(-d // size)
    if grouped and act_order:  # static groups, fitted to the original weights
        scale, zero_point = _fit(w, spec, observer, options)
    elif grouped:
        scale = torch.empty(rows, n_groups, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                            device=w.device)
        zero_point = torch.empty(rows, n_groups, dtype=torch.int32, device=w.device)
    elif grid is not None:
        scale, zero_point = grid
    else:
        scale, zero_point = _fit(w, spec, observer, options)
    row_spec = _row_spec(spec)

    def column_grid(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if grouped:
            g = j // size
            return scale[:, g].to(dtype), zero_point[:, g].to(dtype)
        return scale.to(dtype).expand(rows), zero_point.to(dtype).expand(rows)

    work = (w[:, perm] if perm is not None else w).clone()
    out = torch.empty_like(work)
    qmin, qmax = float(spec.qmin), float(spec.qmax)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        w1 = work[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            j = int(perm[col]) if perm is not None else col
            if grouped and not act_order and j % size == 0:
                end = min(j + size, d)
                cur = w1[:, i:min(end, i2) - i1]
                if end > i2:  # the group reaches past this block: add the block's pending updates
                    beyond = work[:, i2:end] - err1[:, :i] @ u[i1:col, i2:end]
                    cur = torch.cat([cur, beyond], dim=1)
                s_g, z_g = _fit(cur, row_spec, observer, options)
                scale[:, j // size], zero_point[:, j // size] = s_g, z_g
            s, z = column_grid(j)
            x = w1[:, i]
            q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
            xq = (q - z) * s  # the arithmetic of ops.fake_quantize, so w_q is exactly on the grid
            out[:, col] = xq
            e = (x - xq) / u1[i, i]
            w1[:, i + 1:] -= e[:, None] * u1[i, i + 1:][None, :]
            err1[:, i] = e
        if i2 < d:
            work[:, i2:] -= err1 @ u[i1:i2, i2:]
    if perm is not None:
        out = out[:, torch.argsort(perm)]
    return out, scale, zero_point, lam
