"""lb.gptq on models: error reduction, exact grids, freeze, layer order, convolutions, bad input."""
import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit import ops

W4 = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerChannel(0))
W4G = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerGroup(32))


def _correlated(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g) * torch.logspace(0, -1.5, d)[:, None]
    return torch.randn(n, d, generator=g) @ a


def _out_err(dw, x):
    """mean over input vectors of ||dW x||^2, measured directly."""
    return float((x.double() @ dw.double().T).square().sum(1).mean())


@pytest.mark.parametrize("spec", [W4, W4G])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(spec):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 48))
    x = _correlated(1024, 128, seed=1)
    q = lb.quantize(m, weights=spec)
    w = m[0].weight.detach()
    rtn = ops.fake_quantize(w, spec, *ops.choose_qparams(w, spec))
    report = lb.gptq(q, list(x.split(256)))
    held_out = _correlated(1024, 128, seed=1)[512:]  # same distribution (same A), fresh rows below
    err_rtn, err_gptq = _out_err(w - rtn, x), _out_err(w - q[0].weight.detach(), x)
    assert err_gptq < 0.5 * err_rtn
    r = report["0"]
    assert r.samples == 1024
    assert r.rtn_error == pytest.approx(err_rtn, rel=1e-4) and r.gptq_error == pytest.approx(err_gptq, rel=1e-4)
    assert r.output_power == pytest.approx(_out_err(w, x), rel=1e-4)
    assert _out_err(w - q[0].weight.detach(), held_out) < _out_err(w - rtn, held_out)


def test_result_is_on_the_pinned_grid_and_freeze_reproduces_it_bit_exactly():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))
    x = _correlated(256, 64, seed=2)
    q = lb.quantize(m, weights=W4G, activations=lb.QuantSpec(bits=8, symmetric=False))
    with lb.calibrate(q):
        q(x)
    lb.gptq(q, [x])
    for layer in (q[0], q[2]):
        wq = layer.weight_quant
        assert wq.fixed
        w = layer.weight.detach()
        assert torch.equal(ops.fake_quantize(w, wq.spec, wq.scale, wq.zero_point), w)  # idempotent
        assert torch.equal(layer.quantized_weight(), w)
    y = q(x)
    lb.freeze(q)
    assert torch.equal(q(x), y)
    codes = q[0].qweight.int_repr()
    assert torch.equal(ops.dequantize(codes, W4G, q[0].weight_scale, q[0].weight_zero_point), q[0].weight)


def test_later_layers_see_the_inputs_of_the_quantized_earlier_layers():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    x = _correlated(512, 32, seed=3)
    w3 = W4.replace(bits=3)
    q = lb.quantize(m, weights=w3)
    report = lb.gptq(q, [x[:256], x[256:]])
    assert [r.name for r in report.layers] == ["0", "2"]
    w2 = m[2].weight.detach()
    rtn2 = ops.fake_quantize(w2, w3, *ops.choose_qparams(w2, w3))
    with torch.no_grad():
        seen = q[1](q[0](x))  # layer 0 already GPTQ-quantized
        float_in = m[1](m[0](x))
    assert report["2"].rtn_error == pytest.approx(_out_err(w2 - rtn2, seen), rel=1e-5)
    assert abs(report["2"].rtn_error / _out_err(w2 - rtn2, float_in) - 1) > 1e-3


class _Fork(nn.Module):
    """Two branches reading the same tensor (like q/k/v), one layer after them, one never called."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.unused = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 4), nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x, *, scale=1.0):
        self.calls += 1
        return self.c(torch.tanh(self.a(x) + self.b(x))) * scale


def test_siblings_share_a_pass_and_unreached_layers_are_listed():
    torch.manual_seed(0)
    x = _correlated(128, 16, seed=4)
    q = lb.quantize(_Fork(), weights=W4)
    q.calls = 0
    report = lb.gptq(q, [{"x": x, "scale": 2.0}])  # a dict batch is passed as keyword args
    assert [r.name for r in report.layers] == ["a", "b", "c"]
    assert q.calls == 3  # pass 1: a, b (stops before c); pass 2: c; pass 3 finds only `unused` left
    assert report.unreached == ["unused"] and not q.unused.weight_quant.fixed
    assert all(r.samples == 128 for r in report.layers)
    assert "not reached" in str(report)


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1),
    lambda: nn.Conv2d(4, 6, (3, 2), padding="same", dilation=(2, 1), groups=2, padding_mode="reflect"),
    lambda: nn.Conv1d(4, 6, 3, padding="same", groups=2),
    lambda: nn.Conv1d(3, 5, 4, stride=2, padding=2, padding_mode="circular"),
])
def test_convolutions_use_their_unfolded_inputs(make):
    torch.manual_seed(0)
    conv = make()
    x = torch.randn(6, conv.in_channels, *((9, 8) if isinstance(conv, nn.Conv2d) else (11,)))
    x = x + 0.8 * x.roll(1, dims=-1)  # correlated neighbouring pixels
    q = lb.quantize(nn.Sequential(conv), weights=W4)
    w = conv.weight.detach()
    rtn = ops.fake_quantize(w.reshape(w.shape[0], -1), W4, *ops.choose_qparams(w.reshape(w.shape[0], -1), W4))
    report = lb.gptq(q, [x[:3], x[3:]])
    with torch.no_grad():  # the output error, measured by running the convolution on the weight error
        def err(wq):
            out = q[0].op(x, w - wq.reshape(w.shape), None)
            return float(out.double().square().sum(1).mean() * out[0, 0].numel() / out[0, 0].numel())
        expected_rtn = err(rtn)
        expected_gptq = err(q[0].weight.detach())
    per_position = q[0].op(x, w, None).shape[2:].numel()
    r = report["0"]
    assert r.samples == x.shape[0] * per_position
    assert r.rtn_error == pytest.approx(expected_rtn, rel=1e-4)
    assert r.gptq_error == pytest.approx(expected_gptq, rel=1e-4)
    assert r.gptq_error < r.rtn_error


def test_dead_inputs_keep_their_round_to_nearest_weights():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 8))
    x = _correlated(200, 24, seed=5)
    x[:, [3, 10]] = 0
    q = lb.quantize(m, weights=W4)
    lb.gptq(q, [x])
    w = m[0].weight.detach()
    rtn = ops.fake_quantize(w, W4, *ops.choose_qparams(w, W4))
    got = q[0].weight.detach()
    assert torch.isfinite(got).all()
    assert torch.equal(got[:, [3, 10]], rtn[:, [3, 10]])


class _Boom(nn.Module):
    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("boom")
        return x


def test_a_failed_run_restores_every_layer():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), _Boom(at=2), nn.Linear(16, 4))
    q = lb.quantize(m, weights=W4)
    before = q[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        lb.gptq(q, [_correlated(64, 16, seed=6)])  # layer 0 is done when the second pass fails
    assert torch.equal(q[0].weight.detach(), before) and not q[0].weight_quant.fixed
    assert not q[2].weight_quant.fixed and not q[0]._forward_pre_hooks


def test_without_restore_copy_gives_the_same_codes_and_keeps_no_weight_copy(monkeypatch):
    from lowbit.gptq.driver import without_restore_copy

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = [_correlated(64, 16, seed=7)]
    ref = lb.quantize(m, weights=W4G.replace(granularity=lb.PerGroup(8)))
    lb.gptq(ref, x, act_order=True)
    q = lb.quantize(m, weights=W4G.replace(granularity=lb.PerGroup(8)))
    clones = []
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.shape) or real_clone(t, *a, **k))
    with without_restore_copy():
        lb.gptq(q, x, act_order=True)
    monkeypatch.undo()
    assert (16, 16) not in clones and (4, 16) not in clones   # no copy of a layer's weight
    for a, b in ((ref[0], q[0]), (ref[2], q[2])):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_quant.scale, b.weight_quant.scale)
    # a failure inside the context still restores the grids (the caller drops the weights)
    m2 = nn.Sequential(nn.Linear(16, 16), _Boom(at=2), nn.Linear(16, 4))
    q2 = lb.quantize(m2, weights=W4)
    with without_restore_copy(), pytest.raises(RuntimeError, match="boom"):
        lb.gptq(q2, [_correlated(64, 16, seed=6)])
    assert not q2[0].weight_quant.fixed and not q2[2].weight_quant.fixed


def test_bad_input_is_refused_with_a_clear_message():
    m = nn.Sequential(nn.Linear(8, 4))
    q = lb.quantize(m, weights=W4)
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="wrap it"):
        lb.gptq(q, x)
    with pytest.raises(ValueError, match="empty"):
        lb.gptq(q, [])
    with pytest.raises(ValueError, match="damp"):
        lb.gptq(q, [x], damp=-1)
    with pytest.raises(ValueError, match="block_size"):
        lb.gptq(q, [x], block_size=0)
    with pytest.raises(ValueError, match="matches no"):
        lb.gptq(q, [x], include=["nope*"])
    with pytest.raises(ValueError, match="lb.quantize"):
        lb.gptq(m, [x])
    bad = lb.quantize(m, weights=lb.QuantSpec(bits=4, granularity=lb.PerChannel(1)))
    with pytest.raises(ValueError, match="PerGroup"):
        lb.gptq(bad, [x])
    lb.freeze(q)
    with pytest.raises(ValueError, match="before lb.freeze"):
        lb.gptq(q, [x])


def test_a_generator_of_batches_is_used_for_every_layer_and_exclude_keeps_rtn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = _correlated(64, 16, seed=7)
    q = lb.quantize(m, weights=W4)
    report = lb.gptq(q, (b for b in x.split(16)), exclude=["2"])
    assert [r.name for r in report.layers] == ["0"] and report["0"].samples == 64
    assert not q[2].weight_quant.fixed
