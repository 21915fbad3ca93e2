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
is ``w_F -= (w_q - quant(w_q)) / U_qq * U_{q, F}``. Updates are applied lazily: the columns after a block of
``block_size`` columns receive the block's updates once (one GEMM); inside the block, each column
gathers the updates of the block's earlier columns when its turn comes (one GEMV).

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
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (``U^T U = (H + lambda I)^-1``) and ``lambda``.

    With ``J`` the order-reversing permutation and ``J H J = L L^T`` (Cholesky), ``U = J L^-1 J``:
    it is upper triangular with a positive diagonal and ``U^T U = J L^-T L^-1 J = H^-1``; one
    factorization and one triangular inverse. Computed in float64. ``h`` must already have its
    dead diagonal entries set. ``lambda = damp * mean(diag H)``, multiplied by 10 (up to 6 times)
    while ``H + lambda I`` is not numerically positive definite.
    """
    return _factor(h, damp, None, torch.float64, fix_dead=False)


def _strided_mean(v: torch.Tensor) -> float:
    """``mean(v)`` summed as torch sums a matrix diagonal (a strided view): ``lambda`` comes out
    bit for bit as when it was taken from ``diag`` of the permuted matrix (a contiguous vector is
    summed in another order), whatever buffer layout the factorization uses."""
    tmp = torch.empty(v.shape[0], 2, dtype=torch.float64, device=v.device)
    tmp[:, 0] = v
    return float(tmp[:, 0].mean())


def _factor(h: torch.Tensor, damp: float, perm: torch.Tensor | None, dtype: torch.dtype, *,
            fix_dead: bool = True) -> tuple[torch.Tensor, float]:
    """``U`` (in ``dtype``) and ``lambda`` of :func:`inverse_hessian_factor` for ``P H P^T`` (``perm``
    the column order, None for the natural one), with dead diagonal entries (``<= 0``) set to 1.

    Memory: two ``d x d`` float64 buffers besides ``h`` and the result (at ``d = 8640``, the
    input of a 3B model's ``down_proj``, 600 MB each). The reversed, permuted, damped matrix is
    gathered from ``h`` in column chunks straight into a column-major float64 buffer (LAPACK's
    layout), factorized there in place (``cholesky_ex(out=)``); ``L^-1`` is solved in place of a
    column-major identity (``solve_triangular(out=)``), checked finite and flipped into ``U`` in chunks. The
    arithmetic (the same matrix, one ``potrf``, one ``trsm`` against the identity) is that of
    ``cholesky_ex(J H J + lambda I)`` and ``solve_triangular(L, I)``, so ``U`` is bit for bit the same.
    """
    d = h.shape[0]
    dev = h.device
    order = (perm if perm is not None else torch.arange(d, device=dev)).flip(0)   # J P
    step = max(1, (1 << 22) // max(d, 1))   # columns per gather chunk (16 MB of float32)

    def fill(buf: torch.Tensor) -> None:   # buf = J P H P^T J, dead diagonal entries set to 1
        for c in range(0, d, step):
            buf[:, c:c + step] = h[order[:, None], order[None, c:c + step]]
        if fix_dead:
            dg = buf.diagonal()
            dg[dg <= 0] = 1.0

    buf = torch.empty(d, d, dtype=torch.float64, device=dev).T   # column-major
    fill(buf)
    mean_diag = _strided_mean(buf.diagonal().flip(0))   # diag of P H P^T, in its order
    lam = damp * mean_diag
    info = torch.empty((), dtype=torch.int32, device=dev)
    for attempt in range(7):
        if attempt:
            fill(buf)   # the failed factorization overwrote it
        buf.diagonal().add_(lam)
        torch.linalg.cholesky_ex(buf, out=(buf, info))
        if int(info) == 0:
            inv = torch.zeros(d, d, dtype=torch.float64, device=dev).T   # column-major identity
            inv.diagonal().fill_(1.0)
            torch.linalg.solve_triangular(buf, inv, upper=False, out=inv)
            # finite, checked in column chunks (isfinite on the whole matrix makes float64 temporaries of it)
            if all(bool(torch.isfinite(inv[:, c:c + step]).all()) for c in range(0, d, step)):
                del buf
                u = torch.empty(d, d, dtype=dtype, device=dev)
                for r in range(0, d, step):   # U = J L^-1 J, row chunk by row chunk
                    r2 = min(r + step, d)
                    u[r:r2] = inv[d - r2:d - r].flip(0, 1)
                return u, lam
            del inv
        lam = max(lam * 10.0, 1e-6 * max(mean_diag, 1e-12))
        log.warning("gptq: Hessian not positive definite, retrying with damping %.3g", lam)
    raise ValueError("gptq: the input Hessian stays singular even with heavy damping; the calibration "
                     "inputs may contain inf/NaN, or pass a larger damp")


def _row_spec(spec: QuantSpec) -> QuantSpec:
    """The spec of one group's grid fitted on ``[rows, size]`` (one scale per row)."""
    if spec.number_format.block_size is not None:   # MX/NVFP4: the block is the format's, keep PerGroup
        return spec.replace(rounding="nearest")
    return spec.replace(granularity=PerChannel(0), rounding="nearest")


def _rounder(spec: QuantSpec):
    """``quant(x, s, z)``: the arithmetic of ``ops.fake_quantize`` for one column, so that the
    result is exactly on the grid; the format's own rounding for FP8/NF4/MX (:mod:`lowbit.formats`)."""
    fmt = spec.number_format
    if not fmt.integer_grid:
        return lambda x, s, z: fmt.round(x / s) * s
    qmin, qmax = float(spec.qmin), float(spec.qmax)
    return lambda x, s, z: torch.round(x / s).add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


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
    the ``(scale, zero_point)`` (ONNX shapes of ``spec``) instead of fitting them.
    """
    check_spec(spec)
    options = dict(observer_options or {})
    spec = spec.replace(rounding="nearest")
    rows, d = w.shape
    dtype = w.dtype
    # ``h`` is left as it is (the caller reports errors with it); the factor works on its own copy
    if act_order:
        diag = h.diagonal().to(torch.float64, copy=True)
        diag[diag <= 0] = 1.0   # dead inputs, as the factor sets them
        perm = torch.argsort(diag, descending=True, stable=True)
        del diag
    else:
        perm = None
    u, lam = _factor(h, damp, perm, dtype)

    grouped = isinstance(spec.granularity, PerGroup)
    size = spec.granularity.size if grouped else d
    n_groups = -(-d // size)
    if grid is not None:       # a pinned grid (any granularity)
        scale, zero_point = grid
    elif grouped and (act_order or spec.number_format.coupled_scales):
        # static groups, fitted to the original weights (also when the format's scales depend on
        # each other: double-quantized NF4 scales, NVFP4's FP8 block scales)
        scale, zero_point = _fit(w, spec, observer, options)
    elif grouped:
        scale = torch.empty(rows, n_groups, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                            device=w.device)
        zero_point = torch.empty(rows, n_groups, dtype=torch.int32, device=w.device)
    else:
        scale, zero_point = _fit(w, spec, observer, options)
    row_spec = _row_spec(spec)

    # per-column grid, in the compute dtype: one row of (scale, zero point) per group (or one in all)
    sc = scale.to(dtype).reshape(rows, -1).T.contiguous() if scale.dim() else scale.to(dtype).expand(1, rows)
    zc = zero_point.to(dtype).reshape(rows, -1).T.contiguous() if zero_point.dim() else \
        zero_point.to(dtype).expand(1, rows)

    # transposed layout: column j of W is the contiguous row j of work; out is in the natural
    # order (out[j] is column j of the result), so no permuted copy is made at the end
    work = (w.T[perm] if perm is not None else w.T).contiguous()
    out = torch.empty_like(work)
    ut = u.T.contiguous()  # ut[i2:, i1:i2] = U[i1:i2, i2:]^T
    diag = u.diagonal().tolist()
    quant = _rounder(spec)
    static = act_order or spec.number_format.coupled_scales
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        err1 = torch.zeros(i2 - i1, rows, dtype=dtype, device=w.device)
        for i in range(i2 - i1):
            col = i1 + i
            j = int(perm[col]) if perm is not None else col
            g = j // size if grouped else 0
            if grouped and not static and grid is None and j % size == 0:  # a group starts: fit its grid now,
                end = min(j + size, d)                      # to its weights with pending updates applied
                cur = work[col:end] - ut[col:end, i1:col] @ err1[:i] if i else work[col:end]
                s_g, z_g = _fit(cur.T, row_spec, observer, options)
                s_g, z_g = s_g.reshape(-1), z_g.reshape(-1)
                scale[:, g], zero_point[:, g] = s_g, z_g
                sc[g], zc[g] = s_g.to(dtype), z_g.to(dtype)
            s, z = sc[g], zc[g]
            # the column with the updates of this block's earlier columns (left-looking)
            x = torch.addmv(work[col], err1[:i].T, u[i1:col, col], alpha=-1.0) if i else work[col]
            # the arithmetic of ops.fake_quantize, so that the result is exactly on the grid
            xq = quant(x, s, z)
            out[j] = xq
            torch.sub(x, xq, out=err1[i]).div_(diag[col])
        if i2 < d:
            work[i2:].addmm_(ut[i2:, i1:i2], err1, alpha=-1.0)
    del work, ut, u
    return out.T, scale, zero_point, lam
