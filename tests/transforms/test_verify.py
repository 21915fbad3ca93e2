"""Function-preserving transforms check themselves on a reference batch; norms are folded by their
real form (x * w, or Gemma's x * (1 + w)), and a norm of another form is not folded."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.transforms.dataflow import norm_offset
from lowbit.transforms.verify import check_preserved


class GemmaRMSNorm(nn.Module):
    """transformers' Gemma RMSNorm: ``x / rms(x) * (1 + w)``."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


class ExpRMSNorm(nn.Module):
    """A norm of another form, ``x / rms(x) * exp(w)``: a factor cannot be folded into ``w`` linearly."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.exp(self.weight)


class Block(nn.Module):
    def __init__(self, norm, d=16):
        super().__init__()
        self.norm = norm
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        h = self.norm(x)
        return self.out(torch.relu(self.q(h)) * self.k(h))


def _batches():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 8, 16, generator=g) for _ in range(2)]
    for x in xs:
        x[..., 3] *= 30                                   # an outlier channel
    return xs


def test_norm_offset():
    assert norm_offset(nn.LayerNorm(8)) == 0.0
    assert norm_offset(nn.RMSNorm(8)) == 0.0
    assert norm_offset(GemmaRMSNorm(8)) == 1.0
    assert norm_offset(ExpRMSNorm(8)) is None


@pytest.mark.parametrize("transform", ["smooth_quant", "awq"])
@pytest.mark.parametrize("norm,folds", [(GemmaRMSNorm, True), (ExpRMSNorm, False), (nn.LayerNorm, True)])
def test_smoothing_keeps_the_function(transform, norm, folds):
    torch.manual_seed(0)
    m = Block(norm(16)).eval()
    xs = _batches()
    if transform == "smooth_quant":
        s = lb.transforms.smooth_quant(m, xs, alpha=0.5)
        info = s.lowbit_smoothing
    else:
        s = lb.transforms.awq(m, xs, weights=lb.QuantSpec(bits=3, granularity=lb.PerChannel(0)), grid=4)
        info = s.lowbit_awq
    assert (info.layers["q"].how == "folded into norm") == folds
    with torch.no_grad():
        ref, out = m(xs[1]), s(xs[1])
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_check_preserved_names_the_layers():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 4))
    b = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"changed its output .* the layers it changed: 0"):
        check_preserved(a, b, torch.randn(2, 4), lambda m, x: m(x), "a transform", ["0"])
    assert check_preserved(a, a, torch.randn(2, 4), lambda m, x: m(x), "a transform", ["0"]) == 0.0


class ScaledConv(nn.Conv2d):
    """A Conv2d subclass computing another function (2x): folding BatchNorm into it must not pass silently."""

    def forward(self, x):
        return 2 * super().forward(x)


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


def test_bn_fold_checks_itself(monkeypatch):
    from lowbit.transforms import fold_bn
    from lowbit.transforms.fold_bn import fold_batchnorm

    torch.manual_seed(0)
    bad = nn.Sequential(ScaledConv(3, 4, 3), _bn(4)).eval()
    assert fold_batchnorm(bad) == []              # torch.fx traces into the subclass: no pair to fold

    def untraceable(model):
        raise RuntimeError("cannot trace")

    monkeypatch.setattr(fold_bn, "_pairs_by_tracing", untraceable)   # the nn.Sequential fallback pairs it
    with pytest.raises(ValueError, match=r"folding BatchNorm '1' into '0' \(ScaledConv\)"):
        fold_batchnorm(bad)
    good = nn.Sequential(nn.Conv2d(3, 4, 3), _bn(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = good(x)
        assert fold_batchnorm(good) == [("0", "1")]
        torch.testing.assert_close(good(x), ref, rtol=1e-5, atol=1e-5)


def test_bn_fold_in_training_mode_and_untraceable_warn(caplog):
    from lowbit.transforms.fold_bn import fold_batchnorm

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), _bn(4)

        def forward(self, x):
            if x.sum() > 0:          # data-dependent control flow: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return self.bn(self.conv(-x))

    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), _bn(4)).train())
        assert any("training mode" in r.message for r in caplog.records)
        caplog.clear()
        assert fold_batchnorm(Untraceable().eval()) == []
        assert any("could not trace" in r.message and "'bn'" in r.message for r in caplog.records)


def test_equalize_checks_the_function_on_a_reference_batch():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(5, 8)
    e = lb.transforms.equalize(m, reference=x)
    with torch.no_grad():
        torch.testing.assert_close(e(x), m(x), rtol=1e-5, atol=1e-5)


def _calibrated_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    xs = [torch.randn(32, 8) for _ in range(3)]
    q = lb.quantize(m, weights=lb.QuantSpec(bits=4, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(bits=8, symmetric=False))
    with lb.calibrate(q):
        for x in xs:
            q(x)
    return m, q, xs


def test_bias_correction_keeps_the_float_stage():
    """Oracle: the float model. The corrected copy, with its quantizers off and the shifts it removed
    added back to its biases, computes the float model's function (<= 1e-4 relative)."""
    m, q, xs = _calibrated_mlp()
    out = lb.transforms.bias_correction(q, xs)
    assert out.lowbit_bias_correction and any(s.abs().max() > 0 for s in out.lowbit_bias_correction.values())
    f = copy.deepcopy(out)
    for mod in f.modules():
        if isinstance(mod, lb.modules.Quantizer):
            mod.enabled = False
    with torch.no_grad():
        for name, shift in out.lowbit_bias_correction.items():
            f.get_submodule(name).bias.add_(shift)
        ref, got = m(xs[0]), f(xs[0])
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_bias_correction_refuses_a_broken_float_stage(monkeypatch):
    """A correction that changed the float function (here: a bias changed without recording the shift)
    raises, naming the stage and the layers, and the quantized model passed in is left as it was."""
    from lowbit.transforms import bias as bias_mod

    m, q, xs = _calibrated_mlp()
    before = {k: v.clone() for k, v in q.state_dict().items()}

    def forgetful(layer, delta):   # subtracts the shift but forgets it: the float reference moves
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        layer.bias.data.sub_(delta.to(layer.bias.dtype))

    monkeypatch.setattr(bias_mod, "_set_bias", forgetful)
    with pytest.raises(ValueError, match="bias_correction's float stage .* the layers it changed: 0"):
        lb.transforms.bias_correction(q, xs)
    after = q.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(mod.enabled for mod in q.modules() if isinstance(mod, lb.modules.Quantizer))
