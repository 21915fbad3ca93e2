"""AWQ: the float function is kept, and the scaled weights round with less output error than plain RTN."""
import functools

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.transforms import SmoothedLinear, awq
from lowbit.transforms.awq import awq_factors
from lowbit.transforms.pipeline import TRANSFORMS

import _blocks   # tests/_blocks.py

W4 = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerGroup(16))
W3 = lb.QuantSpec(bits=3, granularity=lb.PerChannel(0))


def _salient(n=4, tokens=32, d=64, seed=0, salient=(3, 17, 40), gain=30.0):
    """Inputs where a few channels carry far larger activations (as in LLMs / transformers)."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(n):
        x = torch.randn(tokens, d, generator=g)
        x[:, [c for c in salient if c < d]] *= gain
        xs.append(x)
    return xs


PreLN = functools.partial(_blocks.PreLN, d=32, outlier=20.0, ffn=2, biased="ln2")
PostLN = functools.partial(_blocks.PostLN, d=32, second_norm=False)


def _output_error(float_model, q, xs):
    with torch.no_grad():
        return sum(float(((float_model(x) - q(x)) ** 2).sum()) for x in xs)


def test_factors_are_one_at_alpha_zero_and_centred_on_a_log_scale():
    m = torch.tensor([0.5, 2.0, 8.0, 0.0, 1.0])
    assert torch.equal(awq_factors(m, 0.0), torch.ones(5))
    s = awq_factors(m, 0.7)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-6)
    active = m > 0
    assert torch.all(torch.diff(s[active][torch.argsort(m[active])]) > 0)   # monotone in mean|x|
    assert s[3] == s[active].min()                                         # dead channel: the smallest


@pytest.mark.parametrize("model_fn", [PreLN, PostLN])
def test_float_function_is_unchanged_and_the_input_model_untouched(model_fn):
    m = model_fn().eval()
    xs = [x[:, :32].reshape(4, 8, 32) for x in _salient(d=32)]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    a = awq(m, xs, W4)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(a(x), m(x), rtol=1e-4, atol=1e-4)


def test_folds_where_exact_and_is_explicit_elsewhere():
    xs = [x[:, :32].reshape(4, 8, 32) for x in _salient(d=32)]
    pre = awq(PreLN().eval(), xs, W4).lowbit_awq.layers
    assert {pre[n].how for n in "qkv"} == {"folded into ln1"} and pre["fc1"].how == "folded into ln2"
    assert len({pre[n].alpha for n in "qkv"}) == 1                         # one shared factor
    post = awq(PostLN().eval(), xs, W4)
    assert all(post.lowbit_awq.layers[n].how in ("explicit", "unchanged") for n in ("v", "o"))
    kept = awq(PostLN().eval(), xs, W4, explicit=False)
    assert set(kept.lowbit_awq.skipped) == {"v", "o"} and type(kept.v) is nn.Linear


def test_never_worse_than_round_to_nearest_and_clearly_better_with_salient_channels():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 48))
    calib, held_out = _salient(seed=0), _salient(seed=1)
    a = awq(lin, calib, W3)
    assert isinstance(a[0], SmoothedLinear)
    rep = a.lowbit_awq.layers["0"]
    rtn = _output_error(lin, lb.quantize(lin, weights=W3), calib)
    scaled = _output_error(lin, lb.quantize(a, weights=W3), calib)
    n = sum(len(x) for x in calib)
    assert rep.awq_error <= rep.rtn_error
    torch.testing.assert_close(torch.tensor(rep.rtn_error), torch.tensor(rtn / n), rtol=1e-3, atol=0)
    torch.testing.assert_close(torch.tensor(rep.awq_error), torch.tensor(scaled / n), rtol=1e-3, atol=0)
    held_rtn = _output_error(lin, lb.quantize(lin, weights=W3), held_out)
    held_awq = _output_error(lin, lb.quantize(a, weights=W3), held_out)
    assert held_awq < 0.6 * held_rtn


def test_every_layer_of_a_block_is_at_most_its_rtn_error():
    xs = [x[:, :32].reshape(4, 8, 32) for x in _salient(d=32, seed=2)]
    for layer in awq(PreLN().eval(), xs, W4).lowbit_awq.layers.values():
        assert layer.awq_error <= layer.rtn_error * (1 + 1e-6)


def test_registered_and_runs_in_the_pipeline():
    assert TRANSFORMS["awq"].stage == "float"
    m = PostLN().eval()
    xs = [x[:, :32].reshape(4, 8, 32) for x in _salient(d=32)]
    q = lb.transforms.quantize_with(m, xs, transforms=[("awq", {"weights": W4}), ("gptq", {"act_order": True})]
                                    if "gptq" in TRANSFORMS else [("awq", {"weights": W4})], weights=W4)
    layers = [m for m in q.modules() if isinstance(m, lb.modules.QuantLayer)]
    assert layers and all(layer.frozen for layer in layers)


def test_a_bare_linear_layer_becomes_a_smoothed_one():
    lin = nn.Linear(64, 48)
    a = awq(lin, _salient(), W3)
    assert isinstance(a, SmoothedLinear) and a.lowbit_awq.layers[""].how == "explicit"
    torch.testing.assert_close(a(_salient()[0]), lin(_salient()[0]), rtol=1e-4, atol=1e-4)


def test_bad_input():
    xs = _salient(d=64)
    lin = nn.Linear(64, 8)
    with pytest.raises(TypeError, match="weights"):
        awq(lin, xs, "int4")
    with pytest.raises(ValueError, match="grid"):
        awq(lin, xs, W4, grid=0)
    with pytest.raises(ValueError, match="observer"):
        awq(lin, xs, W4, observer="nope")
    with pytest.raises(ValueError, match="static"):
        awq(lin, xs, lb.QuantSpec(bits=8, dynamic=True, granularity=lb.PerToken()))
    with pytest.raises(ValueError, match="before lb.quantize"):
        awq(lb.quantize(nn.Sequential(lin)), xs, W4)
    with pytest.raises(ValueError, match="empty"):
        awq(lin, [], W4)


def test_statistics_are_held_one_input_at_a_time_with_the_same_result(monkeypatch):
    """stats_budget=0: one d x d statistic alive at a time (counted on every update); the model
    and the report are exactly those of stats_budget=None (every statistic in one pass, the
    former behaviour)."""
    import weakref
    import importlib
    from lowbit.transforms import awq as awq_module
    awq_mod = importlib.import_module("lowbit.transforms.awq")
    live, peak = weakref.WeakSet(), [0]

    class Counting(awq_mod._Stats):
        def _add(self, x):
            super()._add(x)
            if self.h is not None:
                live.add(self)
                peak[0] = max(peak[0], sum(1 for s in live if s.h is not None))

    m = PreLN().eval()
    xs = [x[:, :32].reshape(4, 8, 32) for x in _salient(d=32)]
    ref = awq_module(m, xs, W4, stats_budget=None)
    monkeypatch.setattr(awq_mod, "_Stats", Counting)
    one = awq_module(m, xs, W4, stats_budget=0)
    assert peak[0] == 1
    peak[0] = 0
    awq_module(m, xs, W4, stats_budget=None)
    assert peak[0] > 1          # all at once: the count is a real test
    assert ref.lowbit_awq.as_dict() == one.lowbit_awq.as_dict()
    for (k, a), (_, b) in zip(ref.state_dict().items(), one.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="stats_budget"):
        awq_module(m, xs, W4, stats_budget=-1)
