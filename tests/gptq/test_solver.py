"""GPTQ's per-matrix algorithm against oracles: a naive unblocked O(d^3) implementation straight from
the paper's equations, and round to nearest when the inputs are white (H = c I)."""
import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit import ops
from lowbit.gptq.solver import solve


def _grid(w, bits, sym):
    """Per-row min-max (or max-abs) grid, written out by hand (signed 4-bit: [-8, 7])."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if sym:
        r = w.abs().amax(dim=1)
        s = torch.where(r > 0, r / qmax, torch.ones_like(r))
        return s, torch.zeros_like(s)
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / (qmax - qmin), torch.ones_like(hi))
    z = torch.clamp(qmin - torch.round(lo / s), qmin, qmax)
    return s, z


def _q(col, s, z, bits):
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return (torch.clamp(torch.round(col / s) + z, qmin, qmax) - z) * s


def naive_gptq(w, x, *, bits=4, sym=False, group=None, act_order=False, damp=0.01):
    """The paper's equations, column by column, with the explicit inverse-Hessian downdate.

    w: [rows, d]; x: [n, d] calibration inputs. float64 throughout.
    """
    w = w.clone().double()
    h = x.T.double() @ x.double()
    d = h.shape[0]
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(d)
    h = h + damp * h.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    out = torch.zeros_like(w)
    if group is None:
        s, z = _grid(w, bits, sym)
    elif act_order:  # static groups from the original weights
        static = [_grid(w[:, g:g + group], bits, sym) for g in range(0, d, group)]
    for j in order.tolist():
        if group is not None and act_order:
            s, z = static[j // group]
        elif group is not None and j % group == 0:  # group starts: fit to the current weights
            s, z = _grid(w[:, j:j + group], bits, sym)
        qcol = _q(w[:, j], s, z, bits)
        err = (w[:, j] - qcol) / hinv[j, j]
        w = w - err[:, None] * hinv[j, :][None, :]  # OBS update of the remaining weights
        out[:, j] = qcol
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]  # remove j from the inverse
    return out


def _correlated(n, d, seed, dead=()):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = a * torch.logspace(0, -2, d, dtype=torch.float64)[:, None]  # decaying spectrum: H far from diagonal
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ a
    x[:, list(dead)] = 0
    return x


@pytest.mark.parametrize("group,act_order,sym", [(None, False, False), (8, False, False), (8, False, True),
                                                  (None, True, True), (8, True, False)])
def test_blocked_gptq_matches_the_naive_reference(group, act_order, sym):
    torch.manual_seed(1)
    rows, d = 6, 20  # group 8 leaves a partial last group; block_size 7 splits groups across blocks
    x = _correlated(64, d, seed=2, dead=(5,))
    m = nn.Sequential(nn.Linear(d, rows)).double()
    gran = lb.PerGroup(group) if group else lb.PerChannel(0)
    q = lb.quantize(m, weights=lb.QuantSpec(bits=4, symmetric=sym, granularity=gran))
    lb.gptq(q, [x[:40], x[40:]], block_size=7, act_order=act_order)
    expected = naive_gptq(m[0].weight.detach(), x, sym=sym, group=group, act_order=act_order)
    torch.testing.assert_close(q[0].weight.detach(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("gran", [lb.PerChannel(0), lb.PerGroup(16), lb.PerTensor()])
@pytest.mark.parametrize("act_order", [False, True])
def test_white_inputs_give_round_to_nearest_exactly(gran, act_order):
    d = 32
    hadamard = torch.ones(1, 1)
    while hadamard.shape[0] < d:  # Sylvester: rows are exactly orthogonal, X^T X = d I in floating point
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(d, 12))
    spec = lb.QuantSpec(bits=4, symmetric=False, granularity=gran)
    q = lb.quantize(m, weights=spec)
    lb.gptq(q, [hadamard * 0.5], act_order=act_order)
    w = m[0].weight.detach()
    rtn = ops.fake_quantize(w, spec, *ops.choose_qparams(w, spec))
    assert torch.equal(q[0].weight.detach(), rtn)


def test_solve_puts_every_weight_on_the_returned_grid():
    torch.manual_seed(3)
    w = torch.randn(16, 48)
    x = _correlated(200, 48, seed=4).float()
    spec = lb.QuantSpec(bits=3, symmetric=False, granularity=lb.PerGroup(16))
    w_q, scale, zero_point, lam = solve(w, x.T @ x, spec, block_size=20)
    assert scale.shape == (16, 3) and zero_point.dtype == torch.int32 and lam > 0
    assert torch.equal(ops.fake_quantize(w_q, spec, scale, zero_point), w_q)


@pytest.mark.parametrize("act_order", [False, True])
def test_in_place_factor_is_the_plain_formula_bit_for_bit(act_order):
    """The factor works in two float64 buffers (gather, in-place Cholesky and triangular solve); it
    must give exactly ``J L^-1 J`` of the plain out-of-place formula, and leave the Hessian as it was."""
    from lowbit.gptq.solver import _factor

    d = 203   # not a multiple of anything
    x = _correlated(300, d, seed=4, dead=(7,)).float()
    h = x.T @ x
    h0 = h.clone()
    hd = h.double()
    hd[7, 7] = 1.0
    perm = torch.argsort(hd.diagonal(), descending=True, stable=True) if act_order else torch.arange(d)
    hp = hd[perm][:, perm]
    lam = 0.01 * float(hp.diagonal().mean())
    eye = torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(hp.flip(0, 1) + lam * eye)
    expected = torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
    u, lam2 = _factor(h, 0.01, perm if act_order else None, torch.float64)
    assert lam2 == lam and torch.equal(u, expected)
    u32, _ = _factor(h, 0.01, perm if act_order else None, torch.float32)
    assert torch.equal(u32, expected.float()) and torch.equal(h, h0)
    w = torch.randn(5, d)
    solve(w, h, lb.QuantSpec(bits=4, granularity=lb.PerGroup(32)), act_order=act_order)
    assert torch.equal(h, h0)
