"""HQQ range method: never worse than min-max in its own l_p objective, better on heavy tails.

(Not in squared error: an l_p, p < 1, fit ignores outliers, so on heavy tails it may clip them
and raise the MSE; that is HQQ's design, not a defect.)"""
import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit import ops
from lowbit.ops.hqq import shrink_lp


def _lp_rows(w, spec, s, z, p=0.7):
    """Per-row sum |w - w^|^p, with w^ computed by hand: (clamp(round(w/s)+z) - z) * s."""
    s, z = s.reshape(w.shape[0], -1).repeat_interleave(w.shape[1] // s.reshape(w.shape[0], -1).shape[1], 1), \
        z.reshape(w.shape[0], -1).repeat_interleave(w.shape[1] // z.reshape(w.shape[0], -1).shape[1], 1).float()
    wq = (torch.clamp(torch.round(w / s) + z, spec.qmin, spec.qmax) - z) * s
    return (w - wq).abs().pow(p).sum(1), (w - wq).square().sum(1)


def _heavy(rows=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(2.5).sample((rows, cols)) * 0.02  # weight-like scale, heavy tails
    return w + 0.01 * torch.randn(rows, 1, generator=g)  # and an offset per row


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("gran", [lb.PerChannel(0), lb.PerGroup(64)])
def test_hqq_is_never_worse_than_minmax_in_its_objective_and_better_on_heavy_tails(symmetric, gran):
    torch.manual_seed(0)
    w = _heavy()
    spec = lb.QuantSpec(bits=4, symmetric=symmetric, granularity=gran)
    rows = ops.to_rows(w, spec)
    lp_h, mse_h = _lp_rows(rows, spec, *[t.reshape(-1) for t in ops.choose_qparams(w, spec, "hqq")])
    lp_m, mse_m = _lp_rows(rows, spec, *[t.reshape(-1) for t in ops.choose_qparams(w, spec, "minmax")])
    assert (lp_h <= lp_m * (1 + 1e-6)).all()  # the min-max start is a candidate of every row
    assert lp_h.sum() < 0.97 * lp_m.sum()  # and the half-quadratic steps improve on it
    if symmetric:
        assert (ops.choose_qparams(w, spec, "hqq")[1] == 0).all()


def test_the_range_maps_back_to_a_valid_grid_and_partial_groups_ignore_padding():
    w = _heavy(8, 100)
    spec = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerGroup(64))
    s, z = ops.choose_qparams(w, spec, "hqq")
    assert s.shape == (8, 2) and (s > 0).all() and z.dtype == torch.int32
    s_tail, z_tail = ops.choose_qparams(w[:, 64:], spec.replace(granularity=lb.PerChannel(0)), "hqq")
    torch.testing.assert_close(s[:, 1], s_tail, rtol=1e-5, atol=0)
    assert torch.equal(z[:, 1], z_tail)


def test_degenerate_rows_and_weight_observer():
    spec = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerChannel(0))
    w = torch.stack([torch.zeros(16), torch.full((16,), 0.3), torch.linspace(-1, 2, 16)])
    s, z = ops.choose_qparams(w, spec, "hqq")
    s_mm, z_mm = ops.choose_qparams(w, spec, "minmax")
    assert torch.equal(s[:2], s_mm[:2]) and torch.equal(z[:2], z_mm[:2])  # nothing to fit: min-max
    assert torch.isfinite(s).all()
    m = nn.Sequential(nn.Linear(16, 4))
    q = lb.quantize(m, weights=spec, weight_observer="hqq")
    assert q[0].weight_quant.observer == "hqq" and torch.isfinite(q(torch.randn(2, 16))).all()


def test_shrink_is_the_proximal_step_of_the_l1_norm_for_p_1():
    r = torch.linspace(-2, 2, 41)
    torch.testing.assert_close(shrink_lp(r, 2.0, 1.0), torch.sign(r) * (r.abs() - 0.5).clamp_min(0))
    # p < 1: small residuals are zeroed, large ones barely shrunk
    out = shrink_lp(torch.tensor([0.01, 10.0]), 10.0, 0.7)
    assert out[0] == 0 and 9.9 < out[1] < 10


def test_bad_options_are_refused():
    w = torch.randn(4, 16)
    spec = lb.QuantSpec(bits=4, granularity=lb.PerChannel(0))
    for bad in ({"p": 0}, {"p": 3}, {"beta": 0}, {"kappa": 0.5}, {"iters": -1}):
        with pytest.raises(ValueError, match="hqq"):
            ops.choose_qparams(w, spec, "hqq", **bad)
