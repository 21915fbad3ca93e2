import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.transforms import BoundedReLU, activation_clipping, bound_activations


def test_bounded_relu_clips_exactly_at_the_limit_and_passes_the_rest():
    x = torch.linspace(-10, 10, 2001)
    x = torch.cat([x, torch.tensor([2.5, 2.5000002, -0.0, 1e-30])])
    y = BoundedReLU(2.5)(x)
    below = (x >= 0) & (x <= 2.5)
    assert torch.equal(y[below], x[below])                     # unchanged, bit for bit
    assert torch.equal(y[x > 2.5], torch.full_like(y[x > 2.5], 2.5))
    assert torch.equal(y[x < 0], torch.zeros_like(y[x < 0]))
    assert torch.equal(y, torch.clamp(x, 0, 2.5))


def test_per_channel_limits_after_scaling():
    act = BoundedReLU(4.0)
    act.scale_channels(torch.tensor([1.0, 0.5, 2.0]), (3, 1))
    assert act.limit == 8.0
    x = torch.full((2, 3, 5), 5.0)
    y = act(x)
    assert torch.equal(y[:, 0], torch.full((2, 5), 4.0))
    assert torch.equal(y[:, 1], torch.full((2, 5), 2.0))
    assert torch.equal(y[:, 2], torch.full((2, 5), 5.0))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.b(F.relu(self.a(x))) + self.b(self.act(self.a(x)).relu())


def test_bound_activations_returns_a_bounded_copy():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 2))
    with torch.no_grad():
        m[0].weight.mul_(5)
    x = torch.randn(64, 4)
    b = bound_activations(m, limit=1.0)
    assert type(m[1]) is nn.ReLU and type(m[2][1]) is nn.ReLU        # the input is untouched
    assert isinstance(b[1], BoundedReLU) and isinstance(b[2][1], BoundedReLU)
    assert b.lowbit_bounded == ["1", "2.1"]
    # oracle: the same layers with clamp
    h = torch.clamp(m[0](x), 0, 1.0)
    h = torch.clamp(m[2][0](h), 0, 1.0)
    assert torch.allclose(b(x), m[3](h), atol=1e-6)
    assert not torch.allclose(b(x), m(x), atol=1e-3)                 # the bound does clip here
    # a bound above every activation leaves the function unchanged
    assert torch.equal(bound_activations(m, limit=1e9)(x), m(x))


def test_functional_relus_become_bounded_when_asked():
    torch.manual_seed(0)
    m = Functional()
    x = 3 * torch.randn(32, 4)
    lim = 0.5
    expected = m.b(torch.clamp(m.a(x), 0, lim)) + m.b(torch.clamp(torch.clamp(m.a(x), 0, lim), 0, lim))
    only_modules = bound_activations(m, lim)
    assert not torch.allclose(only_modules(x), expected, atol=1e-4)   # F.relu and .relu() stay unbounded
    g = bound_activations(m, lim, functional=True)
    assert isinstance(g, torch.fx.GraphModule)
    assert torch.allclose(g(x), expected, atol=1e-6)
    assert len(g.lowbit_bounded) == 3


def test_activation_clipping_counts_what_the_bound_clips():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
    batches = [torch.randn(32, 4) * 3 for _ in range(3)]
    stats = activation_clipping(m, batches, limit=1.0)
    with torch.no_grad():
        h1 = [torch.relu(m[0](x)) for x in batches]
        h2 = [torch.relu(m[2](h)) for h in h1]
    for name, hs in (("1", h1), ("3", h2)):
        assert stats[name].total == sum(h.numel() for h in hs)
        assert stats[name].clipped == sum(int((h > 1.0).sum()) for h in hs)
        assert stats[name].max_value == pytest.approx(max(float(h.max()) for h in hs))
    assert 0 < stats["1"].fraction < 1
    # on the bounded copy the same count comes from the inputs of the bounded ReLUs
    bounded = activation_clipping(bound_activations(m, 1.0), batches, limit=1.0)
    assert bounded["1"].clipped == stats["1"].clipped


def test_bad_input():
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="limit"):
            bound_activations(m, bad)
    with pytest.raises(TypeError, match="limit"):
        bound_activations(m, "6")
    with pytest.raises(ValueError, match="empty"):
        activation_clipping(m, [])
    with pytest.raises(ValueError, match="no nn.ReLU"):
        activation_clipping(nn.Linear(2, 2), [torch.randn(1, 2)])
