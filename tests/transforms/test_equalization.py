import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit as lb
from lowbit.transforms import BoundedReLU, bound_activations, equalize, find_equalization_pairs


def _spread(model, seed=0, decades=2.0):
    """Scale each layer's output channels by very different factors (the input of the next by the inverse)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in find_equalization_pairs(model):
            a, b = model.get_submodule(p.first), model.get_submodule(p.second)
            c = a.weight.shape[0]
            s = 10 ** (decades * (torch.rand(c, generator=g) - 0.5))
            a.weight.mul_(s.reshape((-1,) + (1,) * (a.weight.dim() - 1)))
            if a.bias is not None:
                a.bias.mul_(s)
            if isinstance(b, nn.Linear):
                b.weight.div_(s.repeat_interleave(b.in_features // c))
            else:
                per_in = s.reshape(b.groups, 1, -1).expand(b.groups, b.out_channels // b.groups, -1)
                b.weight.div_(per_in.reshape(b.out_channels, -1).reshape(b.weight.shape[:2] + (1,) * (b.weight.dim() - 2)))
    return model


def _cnn():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),          # depthwise
        nn.Conv2d(8, 12, 1, groups=2), nn.LeakyReLU(0.1),            # grouped
        nn.Flatten(), nn.Linear(12 * 16, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 10))
    m[1].running_var.uniform_(0.5, 2)
    m[1].running_mean.uniform_(-1, 1)
    return m.eval()


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 6, 3, padding=1), nn.Conv1d(6, 6, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(6 * 8, 10), nn.Linear(10, 4)
        self.skip = nn.Linear(10, 4)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = torch.flatten(self.c2(h).relu(), 1)
        h = F.relu(self.fc1(h))
        return self.fc2(h) + self.skip(h)   # fc1's output feeds two layers: not a pair


def _ranges(model, pair):
    """Independent oracle: max |w| per output row of the first layer, per input channel of the second."""
    a, b = model.get_submodule(pair.first), model.get_submodule(pair.second)
    c = a.weight.shape[0]
    r1 = a.weight.detach().abs().reshape(c, -1).amax(1)
    w = b.weight.detach().abs()
    if isinstance(b, nn.Linear):
        r2 = w.reshape(w.shape[0], c, -1).amax(dim=(0, 2))
    else:
        r2 = torch.stack([w[(j // (c // b.groups)) * (b.out_channels // b.groups):
                            (j // (c // b.groups) + 1) * (b.out_channels // b.groups), j % (c // b.groups)].max()
                          for j in range(c)])
    return r1, r2


def test_float_function_is_unchanged_and_ranges_meet_at_the_fixed_point():
    m = _spread(_cnn())
    x = torch.randn(32, 1, 8, 8)
    e = equalize(m)
    assert [(p.first, p.second) for p in e.lowbit_equalized] == [("0", "4"), ("4", "6"), ("6", "9"), ("9", "12")]
    assert isinstance(m[1], nn.BatchNorm2d)                      # the input model is untouched
    assert torch.allclose(e(x), m(x), rtol=1e-4, atol=1e-5)
    for p in e.lowbit_equalized:
        r1, r2 = _ranges(e, p)
        assert torch.allclose(r1 / r1.max(), r2 / r2.max(), rtol=1e-4), p
    r1_before, _ = _ranges(m, e.lowbit_equalized[1])     # the spread channels became far more equal
    r1_after, _ = _ranges(e, e.lowbit_equalized[1])
    assert r1_after.max() / r1_after.min() < 0.2 * r1_before.max() / r1_before.min()


def test_traced_model_with_functional_relus_and_flatten():
    torch.manual_seed(1)
    m = Custom().eval()
    pairs = [(p.first, p.second, p.flatten) for p in find_equalization_pairs(m)]
    assert pairs == [("c1", "c2", False), ("c2", "fc1", True)]
    x = torch.randn(16, 3, 8)
    e = equalize(_spread(m))
    assert torch.allclose(e(x), m(x), rtol=1e-4, atol=1e-5)


def test_bounded_relu_limits_move_with_the_channels():
    m = _spread(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU6(), nn.Linear(16, 3)).eval())
    b = bound_activations(m, limit=0.5)
    x = 4 * torch.randn(256, 6)
    e = equalize(b)
    assert isinstance(e[1], BoundedReLU) and e[1].channel_limits is not None
    assert isinstance(e[3], BoundedReLU) and e[3].channel_limits is not None   # ReLU6 -> per-channel bound
    assert torch.allclose(e(x), b(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(b(x), m(x), atol=1e-3)    # the bounds clip, and the equalized copy clips the same


def _sqnr(ref, out):
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


@pytest.mark.parametrize("bits,gain_db", [(8, 20.0), (4, 10.0)])
def test_equalization_helps_per_tensor_weight_quantization(bits, gain_db):
    torch.manual_seed(0)
    m = _spread(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval(),
                decades=3.0)
    x = torch.randn(512, 32)
    spec = lb.QuantSpec(bits=bits)    # per-tensor weights
    with torch.no_grad():
        before = _sqnr(m(x), lb.quantize(m, weights=spec)(x))
        e = equalize(m)
        after = _sqnr(m(x), lb.quantize(e, weights=spec)(x))
    assert after > before + gain_db, (before, after)


def test_bad_input_and_no_pairs():
    m = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="float model"):
        equalize(lb.quantize(m))
    with pytest.raises(ValueError, match="iterations"):
        equalize(m, iterations=0)
    with pytest.raises(TypeError, match="nn.Module"):
        equalize("model")
    # a non-homogeneous op between the layers: nothing is paired
    assert find_equalization_pairs(nn.Sequential(nn.Linear(2, 4), nn.Sigmoid(), nn.Linear(4, 2))) == []
