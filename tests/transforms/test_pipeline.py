import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.transforms import TRANSFORMS, bias_correction, bound_activations, equalize, quantize_with, register_transform

W4 = lb.QuantSpec(bits=4)
A8 = lb.QuantSpec(bits=8, symmetric=False)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def test_quantize_with_is_the_manual_composition():
    m = _net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    batches = [torch.rand(32, 6) * 3 for _ in range(3)]
    x = torch.randn(64, 6)
    got = quantize_with(m, batches, weights=W4, activations=A8,
                        transforms=[("bound", {"limit": 2.0}), "equalize", "bias_correction"])
    f = equalize(bound_activations(m, limit=2.0))
    q = lb.quantize(f, weights=W4, activations=A8)
    with lb.calibrate(q):
        for b in batches:
            q(b)
    want = lb.freeze(bias_correction(q, batches))
    with torch.no_grad():
        assert torch.equal(got(x), want(x))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(layer.frozen for _, layer in lb.quant_layers(got))
    plain = quantize_with(m, batches, weights=W4, activations=A8, freeze=False)
    assert not any(layer.frozen for _, layer in lb.quant_layers(plain))


def test_registered_transforms_join_by_name():
    calls = []

    def mark(model, batches, tag="x"):
        calls.append((tag, len(batches)))
        return model

    register_transform("test_mark", "float", mark)
    try:
        quantize_with(_net(), [torch.randn(4, 6)] * 2, weights=W4, transforms=[("test_mark", {"tag": "t"})])
    finally:
        TRANSFORMS.pop("test_mark")
    assert calls == [("t", 2)]


def test_bad_input():
    m = _net()
    with pytest.raises(ValueError, match="unknown transform 'cle'"):
        quantize_with(m, [torch.randn(4, 6)], weights=W4, transforms=["cle"])
    with pytest.raises(TypeError, match="options"):
        quantize_with(m, [torch.randn(4, 6)], weights=W4, transforms=[("equalize", 3)])
    with pytest.raises(ValueError, match="empty"):
        quantize_with(m, [], weights=W4)
    with pytest.raises(ValueError, match="stage"):
        register_transform("x", "before", lambda m, b: m)
