"""to_integer on whole models: links, per-layer agreement in place, end-to-end agreement."""
import copy

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit import ops
from lowbit.integer import IntegerLayer, to_integer

W8C = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))
W4G = lb.QuantSpec(bits=4, granularity=lb.PerGroup(8))
AU8 = lb.QuantSpec(bits=8, signed=False, symmetric=False)
A8 = lb.QuantSpec(bits=8, symmetric=False)


def cnn(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU6(), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(),
                      nn.Dropout(0.1), nn.Linear(32, 10))
    m[1].running_var.uniform_(0.5, 2)
    return m.eval()


def cnn1d(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3, stride=2, groups=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 19, 6)).eval()


def _frozen(make, w, a, x):
    q = lb.quantize(make(), weights=w, activations=a)
    with lb.calibrate(q):
        q(x)
    return lb.freeze(q)


def _capture_inputs(model, names):
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0]))
             for n in names]
    return seen, hooks


@pytest.mark.parametrize("make,w,a,shape,links", [
    (cnn, W8C, AU8, (128, 1, 8, 8), {"0": "4", "4": "7", "7": "10"}),
    (cnn, W8C, A8, (128, 1, 8, 8), {"0": "4", "4": "7", "7": "10"}),
    (cnn1d, W8C, AU8, (128, 1, 40), {"0": "2", "2": "5"}),
    (cnn1d, W4G, A8, (128, 1, 40), {}),
])
@torch.no_grad()
def test_whole_cnn_on_integers(make, w, a, shape, links):
    torch.manual_seed(1)
    x = torch.randn(*shape)
    q = _frozen(make, w, a, x)
    before = copy.deepcopy(q.state_dict())
    qi = to_integer(q)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())   # q untouched
    info = qi.lowbit_integer
    assert info.requantized == links and info.float_layers == {} and not qi.training
    names = info.integer
    assert all(isinstance(qi.get_submodule(n), IntegerLayer) for n in names)
    seen, hooks = _capture_inputs(qi, names)
    y_int = qi(x)
    for h in hooks:
        h.remove()
    # in place: each integer layer against its fake-quantized twin on the very inputs it received
    for name in names:
        layer, fake = qi.get_submodule(name), q.get_submodule(name)
        y_fake = fake(seen[name])
        if name in links:
            spec, s_out, z_out = layer.output_grid
            q_fake = ops.quantize(y_fake, spec, s_out, z_out).to(torch.int32)
            diff = (layer.forward_codes(seen[name]) - q_fake).abs()
            assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.95, name
        else:
            err = (layer(seen[name]) - y_fake).abs()
            assert float(err.max()) <= 1e-3 * float(y_fake.abs().max()), name
    # end to end: the integer model predicts what the fake-quantized model predicts
    y_fake = q(x)
    agree = (y_int.argmax(-1) == y_fake.argmax(-1)).float().mean()
    assert agree >= 0.97
    assert float((y_int - y_fake).abs().mean()) <= 0.05 * float(y_fake.abs().mean())


def test_requantized_output_feeds_the_next_layer_exactly():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    qi = to_integer(_frozen(cnn, W8C, AU8, x))
    first, second = qi.get_submodule("0"), qi.get_submodule("4")
    seen, hooks = _capture_inputs(qi, ["4"])
    qi(x)
    hooks[0].remove()
    codes, _, _ = second.quantize_input(seen["4"])
    # the values 4 receives lie exactly on its grid: quantize then dequantize changes nothing
    assert torch.equal(ops.dequantize(codes, second.input_spec, second.input_scale, second.input_zero_point), seen["4"])
    assert first.output_grid[0] == second.input_spec


@torch.no_grad()
def test_options_and_models_that_do_not_fit():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    q = _frozen(cnn, W8C, AU8, x)
    assert to_integer(q, requantize=False).lowbit_integer.requantized == {}
    assert torch.allclose(to_integer(q, rounding="gemmlowp")(x), to_integer(q)(x), atol=0.5)

    mixed = lb.quantize(cnn(), weights=W8C, activations=AU8, exclude=["10"])
    wo = lb.quantize(cnn(), weights=W8C)                    # weight-only: nothing to run on integers
    with lb.calibrate(mixed):
        mixed(x)
    lb.freeze(mixed)
    lb.freeze(wo)
    with pytest.raises(ValueError, match="no layer can run on integers"):
        to_integer(wo)
    with pytest.raises(ValueError, match="not frozen"):
        to_integer(lb.quantize(cnn(), weights=W8C))
    with pytest.raises(ValueError, match="no quantized layer"):
        to_integer(cnn())
    with pytest.raises(ValueError, match="rounding"):
        to_integer(q, rounding="up")

    class Partly(nn.Module):                                 # one weight-only layer, data-dependent flow
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, t):
            h = self.a(t)
            return self.b(h) if float(h.detach().sum()) > -1e9 else h

    p = lb.quantize(Partly(), weights=W8C, activations=A8)
    t = torch.randn(5, 6)
    with lb.calibrate(p):
        p(t)
    p.b.input_quant = None                                    # b is weight-only
    lb.freeze(p)
    pi = to_integer(p)
    assert pi.lowbit_integer.integer == ["a"] and "weight-only" in pi.lowbit_integer.float_layers["b"]
    assert not pi.lowbit_integer.traced
    assert float((pi(t) - p(t)).abs().max()) < 1e-3
    with pytest.raises(ValueError, match="layer 'b' cannot run on integers: weight-only"):
        to_integer(p, strict=True)


@torch.no_grad()
def test_residual_output_is_not_requantized():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, t):
            h = torch.relu(self.a(t))
            return self.b(h) + h

    r = lb.quantize(Res(), weights=W8C, activations=AU8)
    t = torch.randn(32, 8)
    with lb.calibrate(r):
        r(t)
    ri = to_integer(lb.freeze(r))
    assert ri.lowbit_integer.requantized == {} and ri.lowbit_integer.traced
    assert float((ri(t) - r(t)).abs().max()) < 0.05


def test_a_loaded_checkpoint_runs_on_integers_like_the_saved_model(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    q = _frozen(cnn, W8C, AU8, x)
    lb.save(q, tmp_path / "q.safetensors")
    q2 = lb.load(tmp_path / "q.safetensors", cnn(seed=5))
    assert torch.equal(to_integer(q2)(x), to_integer(q)(x))
