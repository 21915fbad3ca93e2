import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit as lb
from lowbit.transforms import bias_correction, output_bias

W3 = lb.QuantSpec(bits=3)                       # per-tensor 3-bit weights: a clearly visible shift
A8 = lb.QuantSpec(bits=8, symmetric=False)


def _channel_mean(y, dim):
    return y.movedim(dim, 0).reshape(y.shape[dim], -1).double().mean(1)


def _positive_batches(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g) * 2 + 0.5 for _ in range(n)]   # E[x] far from 0: a large shift


@pytest.mark.parametrize("kind,mode", [("linear", "layer"), ("conv", "layer"), ("conv", "model")])
def test_mean_output_error_of_a_layer_becomes_zero(kind, mode):
    torch.manual_seed(0)
    if kind == "linear":
        m, dim = nn.Sequential(nn.Linear(16, 8, bias=False)), -1
        batches = _positive_batches((32, 5, 16))
        ref = lambda x: F.linear(x, m[0].weight)                                      # noqa: E731
    else:
        m, dim = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, stride=2)), 1
        batches = _positive_batches((8, 3, 9, 9))
        ref = lambda x: F.conv2d(x, m[0].weight, m[0].bias, stride=2, padding=1)    # noqa: E731
    q = lb.quantize(m, weights=W3)
    with torch.no_grad():
        before = _channel_mean(torch.cat([q(x) - ref(x) for x in batches]), dim)
        qc = bias_correction(q, batches, mode=mode)
        after = _channel_mean(torch.cat([qc(x) - ref(x) for x in batches]), dim)
        untouched = _channel_mean(torch.cat([q(x) - ref(x) for x in batches]), dim)
    assert before.abs().max() > 1e-2
    assert after.abs().max() < 1e-5 * max(1.0, before.abs().max().item())
    assert torch.equal(untouched, before)                                   # q itself is not modified
    assert qc[0].bias is not None and (kind == "conv" or q[0].bias is None)  # a bias was created
    assert torch.allclose(qc.lowbit_bias_correction["0"].double(), before, atol=1e-6)


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).eval()


def _outputs_of(model, names, batches):
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: seen[n].append(o)) for n in names]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {n: _channel_mean(torch.cat(v), -1) for n, v in seen.items()}


def test_model_mode_matches_the_float_networks_means_layer_by_layer():
    m = _net()
    batches = _positive_batches((64, 12))
    q = lb.quantize(m, weights=W3, activations=A8)
    with lb.calibrate(q):
        for x in batches:
            q(x)
    names = ["0", "2", "4"]
    ref = _outputs_of(m, names, batches)
    before = _outputs_of(q, names, batches)
    qc = bias_correction(q, batches, mode="model")
    after = _outputs_of(qc, names, batches)
    assert max((before[n] - ref[n]).abs().max() for n in names) > 1e-2
    for n in names:
        assert torch.allclose(after[n], ref[n], atol=1e-5), n
    # and output_bias (mode "model") agrees with this independent measurement
    ob = output_bias(qc, batches, mode="model")
    assert all(ob[n].abs().max() < 1e-5 for n in names)
    ob = output_bias(q, batches, mode="model")
    assert all(torch.allclose(ob[n], before[n] - ref[n], atol=1e-6) for n in names)


def test_correction_reduces_the_output_error():
    m = _net()
    batches = _positive_batches((64, 12), n=4)
    test = _positive_batches((256, 12), n=1, seed=5)[0]
    q = lb.quantize(m, weights=W3)
    with torch.no_grad():
        err = lambda model: (model(test) - m(test)).pow(2).mean().item()   # noqa: E731
        base, layer, model = err(q), err(bias_correction(q, batches, mode="layer")), err(bias_correction(q, batches))
    assert layer < base and model < 0.7 * base, (base, layer, model)


def test_tuple_and_dict_batches():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, a, b=0.0):
            return self.fc(a + b)

    torch.manual_seed(0)
    q = lb.quantize(Two(), weights=W3)
    xs = _positive_batches((16, 4))
    r1 = bias_correction(q, [(x,) for x in xs])
    r2 = bias_correction(q, [{"a": x} for x in xs])
    r3 = bias_correction(q, (x for x in xs))
    assert torch.equal(r1.fc.bias, r2.fc.bias) and torch.equal(r1.fc.bias, r3.fc.bias)
    assert not torch.equal(r1.fc.bias, q.fc.bias)


def test_bad_input():
    m = _net()
    with pytest.raises(ValueError, match="lb.quantize"):
        bias_correction(m, [torch.randn(2, 12)])
    q = lb.quantize(m, weights=W3)
    with pytest.raises(ValueError, match="empty"):
        bias_correction(q, [])
    with pytest.raises(ValueError, match="mode"):
        bias_correction(q, [torch.randn(2, 12)], mode="exact")
    frozen = lb.freeze(copy.deepcopy(q))
    with pytest.raises(ValueError, match="before lb.freeze"):
        bias_correction(frozen, [torch.randn(2, 12)])
