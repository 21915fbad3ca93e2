"""lb.load: bit-identical round trips and clear errors for models that do not fit."""
import copy

import pytest
import safetensors.torch
import torch
from torch import nn

import lowbit as lb

from _blocks import PostLN   # tests/_blocks.py

A8 = lb.QuantSpec(bits=8, symmetric=False)
A8U = lb.QuantSpec(bits=8, signed=False, symmetric=False)
W8 = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))
W4G = lb.QuantSpec(bits=4, granularity=lb.PerGroup(8))
W2 = lb.QuantSpec(bits=2, granularity=lb.PerChannel(0))
W4ASYM = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerChannel(0))
DYN = lb.QuantSpec(bits=8, symmetric=False, dynamic=True, granularity=lb.PerToken())


def cnn2d(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2),
                      nn.ReLU(), nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 5))
    m[1].running_mean.uniform_(-0.5, 0.5)
    m[1].running_var.uniform_(0.5, 2)
    return m.eval()


def cnn1d(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14, 4)).eval()


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _input(make):
    m = make()
    if isinstance(m, Tokens):
        return torch.randn(3, 7, 16)
    return torch.randn(16, 2, 8, 8) if isinstance(m[0], nn.Conv2d) else torch.randn(16, 1, 16)


def _quantized(make, weights, activations, **kw):
    q = lb.quantize(make(), weights=weights, activations=activations, **kw)
    x = _input(make)
    if activations is not None and not activations.dynamic:
        with lb.calibrate(q):
            q(x)
    return q, x


CASES = {
    "w8a8_per_channel": (cnn2d, W8, A8),
    "w8a8u8_conv1d": (cnn1d, W8, A8U),
    "w4_per_group_packed": (cnn2d, W4G, A8),
    "w2": (cnn1d, W2, A8),
    "w4_asymmetric": (cnn2d, W4ASYM, A8U),
    "weight_only_w4": (cnn2d, W4G, None),
    "dynamic_per_token": (Tokens, W8, DYN),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_identical(case, tmp_path):
    make, w, a = CASES[case]
    q, x = _quantized(make, w, a)
    lb.freeze(q)
    path = tmp_path / "q.safetensors"
    lb.save(q, path)
    model_like = make(seed=1) if make is not Tokens else Tokens()   # different float weights: nothing leaks through
    before = copy.deepcopy(model_like.state_dict())
    q2 = lb.load(path, model_like)
    assert torch.equal(q2(x), q(x))
    assert all(torch.equal(before[k], v) for k, v in model_like.state_dict().items())
    for (n1, l1), (n2, l2) in zip(lb.quant_layers(q), lb.quant_layers(q2)):
        assert n1 == n2 and l2.frozen and l2.weight_quant.spec == l1.weight_quant.spec
        assert torch.equal(l2.weight_codes, l1.weight_codes) and l2.weight_codes.dtype == l1.weight_codes.dtype
        assert l2.weight_zero_point.dtype == l1.weight_zero_point.dtype
        assert (l1.input_quant is None) == (l2.input_quant is None)
    assert q2.lowbit_info.folded == q.lowbit_info.folded and q2.lowbit_info.weights == w


def test_unfrozen_model_saves_float_master_weights_and_resumes(tmp_path):
    q, x = _quantized(cnn2d, W4G, A8)
    lb.save(q, tmp_path / "qat.safetensors")
    q2 = lb.load(tmp_path / "qat.safetensors", cnn2d(seed=3))
    assert torch.equal(q2(x), q(x))
    assert not q2[0].frozen and q2[0].weight.requires_grad
    q2(x).sum().backward()                                          # QAT can go on
    assert q2[0].weight.grad is not None
    lb.freeze(q2)
    lb.freeze(q)
    assert torch.equal(q2(x), q(x))


def test_pinned_weight_grid_survives(tmp_path):
    q, x = _quantized(cnn1d, W8, A8)
    s, z = q[6].weight_quant.qparams(q[6].weight)
    q[6].weight_quant.fix_qparams(s * 1.5, z)
    lb.save(q, tmp_path / "q.safetensors")
    q2 = lb.load(tmp_path / "q.safetensors", cnn1d())
    assert q2[6].weight_quant.fixed and torch.equal(q2(x), q(x))


def test_tied_float_weights_are_written_once_and_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(20, 8)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(self.mid(self.emb(t)))

    q = lb.quantize(Tied(), exclude=["head"])
    lb.freeze(q)
    lb.save(q, tmp_path / "t.safetensors")
    assert len(safetensors.torch.load_file(str(tmp_path / "t.safetensors"))) == 4   # emb, mid codes/scale/bias
    q2 = lb.load(tmp_path / "t.safetensors", Tied())
    t = torch.randint(0, 20, (2, 5))
    assert torch.equal(q2(t), q(t)) and q2.head.weight is q2.emb.weight


def _saved(tmp_path):
    q, _ = _quantized(cnn2d, W8, A8)
    lb.freeze(q)
    path = tmp_path / "good.safetensors"
    lb.save(q, path)
    return q, path


def test_mismatched_model_like_names_what_differs(tmp_path):
    _, path = _saved(tmp_path)
    wider = cnn2d()
    wider[6] = nn.Linear(36, 32)
    wider[8] = nn.Linear(32, 5)
    with pytest.raises(ValueError, match=r"6\.weight has shape \[32, 36\].*\[16, 36\]"):
        lb.load(path, wider)
    with pytest.raises(ValueError, match="has no module '8'"):
        lb.load(path, nn.Sequential(*list(cnn2d())[:8]))
    other = cnn2d()
    other[3] = nn.Conv1d(6, 4, 3)
    with pytest.raises(ValueError, match="module '3' is a Conv1d"):
        lb.load(path, other)
    no_bn = cnn2d()
    no_bn[1] = nn.Identity()
    with pytest.raises(ValueError, match="BatchNorm folding"):
        lb.load(path, no_bn)
    extra = cnn2d()
    extra.add_module("9", nn.LayerNorm(5))
    with pytest.raises(ValueError, match=r"lacks: \['9.weight', '9.bias'\]"):
        lb.load(path, extra)
    q, _ = _quantized(cnn2d, W8, A8)
    with pytest.raises(ValueError, match="float model"):
        lb.load(path, q)


def test_uncalibrated_quantizer_and_dtype_mismatch(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.used = nn.Linear(6, 6)
            self.unused = nn.Linear(6, 6)

        def forward(self, x):
            return self.used(x)

    q = lb.quantize(Branchy(), activations=A8)
    x = torch.randn(4, 6)
    with lb.calibrate(q):
        q(x)
    lb.save(q, tmp_path / "b.safetensors")
    q2 = lb.load(tmp_path / "b.safetensors", Branchy())
    assert q2.unused.input_quant.scale is None and q2.used.input_quant.scale is not None
    assert torch.equal(q2(x), q(x)) and q2.lowbit_info.uncalibrated == ["unused.input_quant"]
    with pytest.raises(ValueError, match=r"dtype mismatches.*used.bias: checkpoint float32, model_like float64"):
        lb.load(tmp_path / "b.safetensors", Branchy().double())


def _outlier_tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(8, 6, 16, generator=g) for _ in range(3)]
    for x in xs:
        x[..., 5] *= 30.0
    return xs


@pytest.mark.parametrize("transform", ["smooth_quant", "awq"])
def test_explicit_smoothing_factors_are_rebuilt_on_the_plain_float_model(tmp_path, transform):
    model, xs = PostLN(seed=3).eval(), _outlier_tokens()
    if transform == "smooth_quant":
        smoothed = lb.transforms.smooth_quant(model, xs, alpha=0.8)
    else:
        smoothed = lb.transforms.awq(model, xs, W4ASYM)
    wrapped = [n for n, m in smoothed.named_modules() if isinstance(m, lb.transforms.SmoothedLinear)]
    assert wrapped   # post-LN: the factors cannot fold, so the file must carry the wrappers
    q = lb.quantize(smoothed, weights=W8, activations=A8)
    with lb.calibrate(q):
        for x in xs:
            q(x)
    lb.freeze(q)
    path = lb.save(q, tmp_path / "s.safetensors")
    before = copy.deepcopy(model.state_dict())
    got = lb.load(path, model)                      # the plain model: no wrappers, original weights
    assert all(type(model.get_submodule(n)) is nn.Linear for n in wrapped)   # model_like is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        for x in _outlier_tokens(seed=1):
            assert torch.equal(got(x), q(x))
    again = lb.load(path, smoothed)                  # the smoothed structure still loads as before
    with torch.no_grad():
        assert torch.equal(again(xs[0]), q(xs[0]))


def test_a_smoothed_layer_that_is_not_linear_in_model_like_is_named(tmp_path):
    model, xs = PostLN(seed=3).eval(), _outlier_tokens()
    q = lb.quantize(lb.transforms.smooth_quant(model, xs, alpha=0.8), weights=W8)
    lb.freeze(q)
    path = lb.save(q, tmp_path / "s.safetensors")
    other = PostLN(seed=3).eval()
    other.v = nn.Identity()
    with pytest.raises(ValueError, match="'v' should be an nn.Linear"):
        lb.load(path, other)
