"""certify: the bounds on the logit differences hold under every admissible rounding (checked by
running the quantized model with random, adversarial-sign and differently tie-broken roundings),
and the first-order limit matches its closed form on a linear model."""
import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.analysis import certify
from lowbit.modules import ActQuantizer
from lowbit.ops.params import broadcast_param

DRAWS = 1000


def _grid(aq, v):
    spec = aq.active_spec()
    s = broadcast_param(aq.scale.to(v.dtype), v.shape, spec)
    z = broadcast_param(aq.zero_point.to(v.dtype), v.shape, spec)
    return s, z, spec


def _rounded(q, x, mode, gen):
    """``q(x)`` with every activation quantizer replaced by an independent rounding of the same grid:
    ``uniform``/``sign`` add an error uniform in / at the ends of [-s/2, s/2] and clamp to the range;
    ``half_up``/``half_down``/``half_away``/``half_even`` round to the grid with that tie-breaking."""
    def hook(mod, args, out):
        v = args[0]
        s, z, spec = _grid(mod, v)
        bot, top = (spec.qmin - z) * s, (spec.qmax - z) * s
        if mode in ("uniform", "sign"):
            u = torch.rand(v.shape, generator=gen)
            e = (u - 0.5) if mode == "uniform" else torch.where(u < 0.5, -0.5, 0.5)
            return torch.minimum(torch.maximum(v + e * s, bot), top)
        t = v / s
        r = {"half_up": torch.floor(t + 0.5), "half_down": torch.ceil(t - 0.5),
             "half_away": torch.sign(t) * torch.floor(t.abs() + 0.5), "half_even": torch.round(t)}[mode]
        return (torch.clamp(r + z, spec.qmin, spec.qmax) - z) * s

    handles = [m.register_forward_hook(hook) for m in q.modules() if isinstance(m, ActQuantizer) and m.scale is not None]
    try:
        with torch.no_grad():
            return q(x).double()
    finally:
        for h in handles:
            h.remove()


def _check(m, q, x, rounding="worst", draws=DRAWS, refine=True):
    c = certify(m, q, x, rounding=rounding, refine=refine, attack=20 if rounding == "worst" else 0)
    assert c.available, c.unsupported
    with torch.no_grad():
        zf, zq = m(x).double(), q(x).double()
    t = zf.argmax(1, keepdim=True)
    torch.testing.assert_close(c.measured, (zq.gather(1, t) - zq) - (zf.gather(1, t) - zf))

    def inside(z):
        change = (z.gather(1, t) - z) - (zf.gather(1, t) - zf)
        return bool(((change <= c.upper) & (change >= c.lower)).all()), change

    ok, _ = inside(zq)
    assert ok, "q's own rounding is outside the bounds"
    if c.attack is not None:
        # the adversarial rounding search (gradient steps within every half step) stays inside too
        t_ = t.reshape(-1)
        found = (c.attack.worst - c.margin).scatter(1, t, 0.0)
        assert bool((found >= c.lower - 1e-9).all()), float((c.lower - found).max())
        assert not bool((c.certified & c.attack.falsified).any())
        assert c.as_dict()["attack_below_bound"] == 0 and c.attack.top.equal(t_)
    if rounding == "worst":
        gen = torch.Generator().manual_seed(0)
        reps = 50
        xs = x.repeat(reps, *([1] * (x.dim() - 1)))
        for mode in ("half_up", "half_down", "half_away", "half_even"):
            assert inside(_rounded(q, x, mode, gen))[0], mode
        for mode in ("uniform", "sign"):
            for _ in range(draws // reps // 2):
                z = _rounded(q, xs, mode, gen).reshape(reps, *zq.shape)
                for r in range(reps):
                    ok, change = inside(z[r])
                    assert ok, (mode, float((change - c.upper).max()), float((c.lower - change).max()))
                    # a certified input keeps its class under this rounding
                    assert bool((z[r].argmax(1)[c.certified] == zf.argmax(1)[c.certified]).all())
    return c


def _inputs(x, n=40):
    g = torch.Generator().manual_seed(0)
    return torch.cat([x[:n], torch.rand(8, *x.shape[1:], generator=g) * 2, 3 * x[:6], x[:6] - 0.5])


@pytest.mark.parametrize("bits,act_bits", [(8, 8), (4, 8), (8, 4)])
def test_bounds_hold_under_random_and_adversarial_roundings(rescnn, quantized, bits, act_bits):
    m, x, _ = rescnn
    q = quantized(m, bits, act_bits)
    _check(m, q, _inputs(x))


def test_exact_rounding_and_no_refinement_are_sound_too(rescnn, quantized):
    m, x, _ = rescnn
    q = quantized(m, 8, 8)
    xs = _inputs(x, 20)
    _check(m, q, xs, rounding="exact")
    loose = _check(m, q, xs, refine=False, draws=200)
    tight = certify(m, q, xs)
    assert bool((tight.lower >= loose.lower - 1e-9).all()) or tight.certified_fraction >= loose.certified_fraction


class _Res1d(nn.Module):
    """A 1-D CNN with BatchNorm, a residual block, ReLU6, max and average pooling."""

    def __init__(self, w=8):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(1, w, 5, padding=2), nn.BatchNorm1d(w)
        self.c2, self.b2 = nn.Conv1d(w, w, 3, padding=1), nn.BatchNorm1d(w)
        self.act, self.act6 = nn.ReLU(), nn.ReLU6()
        self.pool, self.avg = nn.MaxPool1d(2), nn.AvgPool1d(2)
        self.fc = nn.Linear(w * 16, 10)

    def forward(self, x):
        h = self.act(self.b1(self.c1(x)))
        h = self.act6(h + self.b2(self.c2(h)))
        return self.fc(self.avg(self.pool(h)).flatten(1))


def test_one_d_residual_cnn_and_mlp(digits, quantized, trained):
    xtr, _, xte, _ = digits
    torch.manual_seed(1)
    m = _Res1d()
    # train on the digits as 64-sample signals
    m1 = _Flat(m)
    trained(m1, steps=100)
    q = quantized(m1, 8, 8)
    c = _check(m1, q, _inputs(xte, 30), draws=400)
    assert c.limit is not None and 0 <= c.limit_fraction <= 1
    torch.manual_seed(2)
    mlp = trained(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                nn.Linear(32, 10)), steps=150)
    q = quantized(mlp, 8, 8)
    c = _check(mlp, q, _inputs(xte, 40), draws=400)
    assert c.certified_fraction > 0.5


class _Flat(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.reshape(x.shape[0], 1, -1))


def test_first_order_limit_of_a_linear_model_is_its_closed_form():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 4)).eval()
    q = lb.quantize(m, weights=lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(bits=8, symmetric=False))
    x = torch.randn(64, 12)
    with lb.calibrate(q):
        q(x)
    c = certify(m, q, x)
    w = q[0].quantized_weight().double()
    aq = q[0].input_quant
    s, z = float(aq.scale), float(aq.zero_point)
    bot, top = (aq.spec.qmin - z) * s, (aq.spec.qmax - z) * s
    h = torch.where((x >= bot) & (x <= top), s / 2, 0.0).double()      # a clipped code cannot move
    t = m(x).argmax(1)
    # z_t - z_k = (w_t - w_k) . Q(x): each rounding moves it by |w_t - w_k| s / 2 at most
    expect = ((w[t].unsqueeze(1) - w.unsqueeze(0)).abs() * h.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(c.limit.change, expect, rtol=1e-5, atol=1e-6)
    # for a linear model the sound bound is the limit up to roundoff: both certify the same inputs
    assert (c.certified == c.limit.certifiable).double().mean() > 0.95


def test_contributions_name_the_layers(rescnn, quantized):
    m, x, _ = rescnn
    q = quantized(m, 8, 8)
    c = certify(m, q, x[:30])
    assert {"c1", "c2", "fc"} <= set(c.sources)
    assert c.contributions.shape == (30, len(c.sources))
    # the shares add up to the binding lower bound of each input (up to the exact gap term)
    k = ((c.margin + c.lower).argmin(1, keepdim=True))
    assert torch.allclose(c.contributions.sum(1), -c.lower.gather(1, k).squeeze(1), rtol=1e-3, atol=1e-3)
    d = c.as_dict(per_input=5)
    assert len(d["per_input"]) == 5 and d["violations"] == 0


def test_bad_input(rescnn, quantized):
    m, x, _ = rescnn
    q = quantized(m, 8, 8)
    with pytest.raises(TypeError, match="x must be"):
        certify(m, q, [x])
    with pytest.raises(ValueError, match="rounding"):
        certify(m, q, x, rounding="up")
    with pytest.raises(ValueError, match="refine"):
        certify(m, q, x, refine=-1)


def test_rounding_attack_reaches_the_closed_form_worst_case_of_a_linear_model():
    """Two classes, a linear model: the worst admissible rounding moves z_0 - z_1 by exactly
    sum |w_0 - w_1| s / 2 (every input inside the grid's range); the search must find it, and
    never go past it (it only tries admissible roundings)."""
    from lowbit.analysis import rounding_attack
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 2)).eval()
    q = lb.quantize(m, weights=lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(bits=6, symmetric=False))
    x = torch.randn(64, 12)
    with lb.calibrate(q):
        q(x)
    q.eval()
    top = m(x).argmax(1)
    a = rounding_attack(q, x, top, steps=5)
    w = q[0].quantized_weight().double()
    b = q[0].bias.double()
    aq = q[0].input_quant
    s, z = float(aq.scale), float(aq.zero_point)
    bot, top_ = (aq.spec.qmin - z) * s, (aq.spec.qmax - z) * s
    sign = torch.where(top == 0, 1.0, -1.0).double().unsqueeze(1)        # z_t - z_k = sign (z_0 - z_1)
    dw = sign * (w[0] - w[1])
    # each input element rounded half a step against dw, clipped at the grid's ends
    worst_x = (x.double() - dw.sign() * s / 2).clamp(bot, top_)
    expect = (dw * worst_x).sum(1) + sign.squeeze(1) * (b[0] - b[1])
    got = a.worst.gather(1, (1 - top).reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    assert a.falsified.equal(expect <= 0) or bool((expect.abs() < 1e-4).any())
    with pytest.raises(ValueError, match="steps"):
        rounding_attack(q, x, top, steps=0)
