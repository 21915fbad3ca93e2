import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import lowbit as lb
from lowbit import ops
from lowbit.analysis import description_length, empirical_entropy, kl, prior_code_length
from lowbit.analysis.mdl import data_code_length, penalty_scale


def test_empirical_entropy_matches_numpy():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (5000,), generator=g) // torch.randint(1, 4, (5000,), generator=g)
    _, counts = np.unique(codes.numpy(), return_counts=True)
    f = counts / counts.sum()
    assert empirical_entropy(codes) == pytest.approx(float(-(f * np.log2(f)).sum()), rel=1e-12)
    assert empirical_entropy(torch.arange(16)) == pytest.approx(4.0)
    assert empirical_entropy(torch.zeros(10, dtype=torch.int8)) == 0.0


@pytest.mark.parametrize("prior", ["laplace", "gaussian"])
def test_prior_code_length_is_the_exact_bin_mass_under_scipy(prior):
    g = torch.Generator().manual_seed(1)
    step = 0.05
    w = torch.round(torch.randn(400, generator=g, dtype=torch.float64) * 2 / step) * step   # values on the grid
    w[0] = 40 * step   # a far tail value
    scale = 0.7
    dist = stats.laplace(scale=scale) if prior == "laplace" else stats.norm(scale=scale)
    x = w.numpy()
    t = np.abs(x)   # the survival function keeps the tails accurate (cdf differences near 1 cancel)
    mass = dist.sf(t - step / 2) - dist.sf(t + step / 2)
    assert prior_code_length(w, step, prior, scale) == pytest.approx(float(-np.log2(mass).sum()), rel=1e-9)
    # small steps: -log2 p(w) - log2 step per weight (the density form of the derivation)
    fine = 1e-4
    dens = float(-(dist.logpdf(x) / math.log(2)).sum() - len(x) * math.log2(fine))
    # (the exact mass differs by O(step) bits at the Laplace kink at 0: hence the tolerance)
    assert prior_code_length(w, fine, prior, scale) == pytest.approx(dens, rel=1e-4)


def test_penalties_map_to_prior_scales():
    lam = 0.25
    w = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    d = 1e-5
    # L1: lam * sum|w| nats = Laplace code length with b = 1/lam, up to constants independent of w
    b = penalty_scale("laplace", lam)
    diff = prior_code_length(w, d, "laplace", b) - prior_code_length(torch.zeros(3), d, "laplace", b)
    assert diff == pytest.approx(lam * float(w.abs().sum()) / math.log(2), rel=1e-5)
    s = penalty_scale("gaussian", lam)
    diff = prior_code_length(w, d, "gaussian", s) - prior_code_length(torch.zeros(3), d, "gaussian", s)
    assert diff == pytest.approx(lam * float(w.square().sum()) / math.log(2), rel=1e-6)


def test_description_length_of_a_quantized_model(rescnn, quantized):
    m, x, y = rescnn
    q = quantized(m, 4, 8)
    dl = description_length(q, [x], y)
    with torch.no_grad():
        nll = float(nn.functional.cross_entropy(q(x), y, reduction="sum"))
    assert dl.data_bits == pytest.approx(nll / math.log(2), rel=1e-5)
    assert dl.samples == len(y)
    for c in dl.layers:
        layer = q.get_submodule(c.name)
        assert c.weights == layer.weight.numel() and c.stored_bits == 4 * c.weights
        assert 0 < c.entropy_bits <= c.stored_bits
        assert c.side_bits == 2 * 32 * layer.weight.shape[0]   # float32 scale + int32 zero point per channel
    assert dl.total_bits == pytest.approx(dl.model_bits + dl.data_bits)
    assert dl.bits_per_weight < dl.stored_bits_per_weight
    # freezing changes nothing about the code
    lb.freeze(q)
    assert description_length(q, [x], y).model_bits == pytest.approx(dl.model_bits)
    with pytest.raises(ValueError, match="labels"):
        data_code_length(q, [x], y[:10])


def _train_sgd(weight_decay: float, digits) -> nn.Module:
    xtr, ytr = digits[0], digits[1]
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(0)
    for _ in range(1000):
        idx = torch.randint(0, len(xtr), (128,), generator=g)
        loss = nn.functional.cross_entropy(m(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_a_weight_decayed_model_quantizes_with_less_error(digits):
    """Two models identical except weight decay: at the same 4 bits the decayed one moves its
    predictions less (lower KL), and its classifier weights have a higher SQNR and a shorter code."""
    x = digits[2]
    spec = lb.QuantSpec(bits=4, granularity=lb.PerChannel(0))
    out = {}
    for wd in (0.0, 1e-2):
        m = _train_sgd(wd, digits)
        q = lb.quantize(m, weights=spec)
        w = m[3].weight.detach()
        s, z = ops.choose_qparams(w, spec, "minmax")
        with torch.no_grad():
            out[wd] = (float(kl(m(x), q(x)).mean()), ops.quant_error(w, spec, s, z).sqnr_db,
                       prior_code_length(w, 1e-3, "gaussian"), float((m(x).argmax(1) == digits[3]).float().mean()))
    (kl0, sqnr0, bits0, acc0), (kl1, sqnr1, bits1, acc1) = out[0.0], out[1e-2]
    assert kl1 < 0.7 * kl0
    assert sqnr1 > sqnr0 + 0.5
    assert bits1 < bits0
    assert acc1 > acc0 - 0.03    # at (nearly) the same accuracy
