import copy

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.modules import QuantConv2d, QuantLinear

A8 = lb.QuantSpec(bits=8, symmetric=False)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    m[1].running_var.uniform_(0.5, 2)
    return m.eval()


def test_returns_a_copy_and_leaves_the_float_model_untouched():
    m = _model()
    before = copy.deepcopy(m.state_dict())
    q = lb.quantize(m, activations=A8)
    assert isinstance(q[0], QuantConv2d) and isinstance(q[4], QuantLinear)
    assert isinstance(m[0], nn.Conv2d) and isinstance(m[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert q.lowbit_info.quantized == ["0", "4", "6"] and q.lowbit_info.folded == [("0", "1")]


def test_calibrated_ranges_are_the_observed_input_ranges():
    m = _model()
    q = lb.quantize(m, activations=A8)
    seen = []
    # calibration passes activations through unchanged (weights are already fake-quantized)
    hook = q[4].register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    batches = [torch.randn(8, 1, 4, 4) for _ in range(3)]
    with lb.calibrate(q):
        for x in batches:
            q(x)
    hook.remove()
    inp = torch.cat(seen)
    lo, hi = min(inp.min().item(), 0.0), max(inp.max().item(), 0.0)
    assert q[4].input_quant.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert q[4].input_quant.zero_point.item() == round(-128 - lo / ((hi - lo) / 255))


def test_w8a8_predicts_like_the_float_model():
    m = _model()
    q = lb.quantize(m, activations=A8)
    x = torch.randn(64, 1, 4, 4)
    with lb.calibrate(q):
        q(x)
    lb.freeze(q)
    assert (q(x).argmax(1) == m(x).argmax(1)).float().mean() > 0.95


def test_include_exclude():
    m = _model()
    q = lb.quantize(m, exclude=["6"])
    assert isinstance(q[6], nn.Linear) and isinstance(q[4], QuantLinear)
    q = lb.quantize(m, include="4")
    assert q.lowbit_info.quantized == ["4"]
    with pytest.raises(ValueError, match="matches no module"):
        lb.quantize(m, exclude=["classifier"])


def test_unsupported_layers_stay_float_and_are_listed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 2)

        def forward(self, t):
            h = self.emb(t)
            h = self.norm(self.attn(h, h, h)[0])
            return self.head(h)

    m = M().eval()
    q = lb.quantize(m)
    assert q.lowbit_info.quantized == ["head"]
    assert set(q.lowbit_info.skipped) == {"emb", "attn.out_proj", "attn", "norm"}
    t = torch.randint(0, 10, (2, 5))
    assert torch.allclose(q(t), m(t), atol=0.05)


def test_bad_input():
    with pytest.raises(ValueError, match="no layer"):
        lb.quantize(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="weights"):
        lb.quantize(_model(), weights=8)
    q = lb.quantize(_model(), activations=A8)
    with pytest.raises(ValueError, match="saw no batch"):
        with lb.calibrate(q):
            pass
    with pytest.raises(ValueError, match="calibrate"):
        lb.freeze(q)
    with pytest.raises(ValueError, match="already quantized"):
        lb.quantize(q)
    with pytest.raises(ValueError, match=r"single Linear.*nn.Sequential\(layer\)"):
        lb.quantize(nn.Linear(4, 4))


def test_a_layer_that_saw_no_data_stays_float_and_freezes():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 2)

        def forward(self, x):
            return self.body(x)

    q = lb.quantize(TwoHeads(), activations=A8)
    with lb.calibrate(q):
        q(torch.randn(8, 4))
    assert q.lowbit_info.uncalibrated == ["unused.input_quant"]
    lb.freeze(q)
    assert q.unused.frozen and not q.unused.input_quant.enabled


def test_torch_transformer_encoder_layers_run_their_quantized_linears():
    """In eval mode nn.TransformerEncoderLayer has a fused path that reads linear1.weight directly."""
    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    x = torch.randn(4, 10, 32)
    q = lb.quantize(m, weights=lb.QuantSpec(bits=2, granularity=lb.PerChannel(0)))
    assert q.lowbit_info.quantized == ["linear1", "linear2"] and "self_attn.out_proj" in q.lowbit_info.skipped
    with torch.no_grad():
        got = q(x)
        torch.backends.mha.set_fastpath_enabled(False)   # oracle: the module-by-module path everywhere
        try:
            want = q(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)   # (attention itself may still run fused)
        assert (got - m(x)).abs().max() > 1e-2              # 2-bit weights do change the output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_quantize_freeze_and_reload(tmp_path, dtype):
    """A bf16/fp16 model stays in its dtype: fake-quantized, frozen (bit-identical) and reloaded."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype).eval()

    m, ids = make(), torch.randint(0, 50, (8, 5), generator=torch.Generator().manual_seed(1))
    q = lb.quantize(m, activations=A8, embeddings=lb.QuantSpec(bits=4, granularity=lb.PerChannel(0)))
    with lb.calibrate(q):
        q(ids)
    with torch.no_grad():
        before = q(ids)
        lb.freeze(q)
        after = q(ids)
    assert before.dtype == after.dtype == dtype and torch.equal(before, after)
    q2 = lb.load(lb.save(q, tmp_path / "h.safetensors"), make())
    with torch.no_grad():
        assert torch.equal(q2(ids), after)
        # a frozen float32 model converted afterwards follows .to(dtype) too
        q32 = lb.freeze(lb.quantize(make().float(), activations=None))
        assert q32.to(dtype)(ids).dtype == dtype


def test_activation_observer_options_do_not_clip_the_weights():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 8))
    with torch.no_grad():
        m[0].weight[0, 0] = 5.0                                     # an outlier weight
    q = lb.quantize(m, activations=lb.QuantSpec(bits=8), observer="percentile",
                    observer_options={"p": 90.0})
    wq = q[0].weight_quant
    assert wq.observer == "minmax" and wq.observer_options == {}
    s, z = lb.ops.choose_qparams(m[0].weight.detach(), wq.spec, "minmax")   # the min/max grid: 5.0 kept
    torch.testing.assert_close(wq.qparams(q[0].weight)[0], s)
    w_only = lb.quantize(m, observer="percentile", observer_options={"p": 90.0})
    assert w_only[0].weight_quant.observer == "percentile"           # weight-only: the options are the weights'


def test_calibration_that_saw_no_finite_value_raises_naming_the_layer():
    q = lb.quantize(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), activations=lb.QuantSpec(bits=8))
    with pytest.raises(ValueError, match=r"calibration of 0\.input_quant: .*only non-finite"):
        with lb.calibrate(q):
            q(torch.full((3, 4), float("inf")))
    assert not any(getattr(m, "observing", False) for m in q.modules())
