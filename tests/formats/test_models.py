"""Every number format through the model verbs: quantize -> calibrate -> freeze -> save -> load,
QTensor packing, observers, QAT gradients and the spec's validation."""
from __future__ import annotations

import pytest
import torch

import lowbit as lb
from lowbit import formats, ops

NEW = ["fp8_e4m3", "fp8_e5m2", "nf4", "nf4_dq", "mxfp4", "mxfp8", "mxint8", "nvfp4"]
FOUR_BIT = ["nf4", "nf4_dq", "mxfp4", "nvfp4"]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))


def _specs(name):
    if name.startswith("fp8"):   # per-channel weights, per-tensor static activations
        return lb.QuantSpec(format=name, granularity=lb.PerChannel(0)), lb.QuantSpec(format=name)
    return lb.QuantSpec(format=name), None


@pytest.mark.parametrize("name", NEW)
def test_quantize_freeze_save_load(name, tmp_path):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    model = _model()
    w, a = _specs(name)
    q = lb.quantize(model, weights=w, activations=a)
    with lb.calibrate(q):
        q(x)
    with torch.no_grad():
        fake = q(x)
        lb.freeze(q)
        frozen = q(x)
    assert torch.equal(fake, frozen)
    # the frozen weight is exactly the format's rounding of the float weight with the stored scale
    layer = q[0]
    ref = ops.fake_quantize(model[0].weight.detach(), w, layer.weight_scale, layer.weight_zero_point)
    assert torch.equal(layer.weight, ref)
    path = tmp_path / "q.safetensors"
    lb.save(q, path)
    q2 = lb.load(path, _model())
    with torch.no_grad():
        assert torch.equal(q2(x), frozen)
    assert q2[0].weight_quant.spec == w
    assert lb.checkpoint.read_quant_map(path)["format_version"] == lb.checkpoint.FORMAT_VERSION
    # fidelity sanity: the quantized model is close to the float one
    with torch.no_grad():
        ref_out = model(x)
    rel = (frozen - ref_out).norm() / ref_out.norm()
    assert rel < (0.25 if name in FOUR_BIT else 0.15 if name == "fp8_e5m2" else 0.1), rel   # E5M2: 2 mantissa bits


@pytest.mark.parametrize("name", NEW)
def test_qtensor_round_trip_and_packing(name):
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(2))
    spec = lb.QuantSpec(format=name)
    t = lb.QTensor.from_float(x, spec)
    codes = ops.quantize(x, spec, t.scale, t.zero_point)
    assert torch.equal(t.int_repr(), codes)
    assert torch.equal(t.dequantize(), ops.fake_quantize(x, spec, t.scale, t.zero_point))
    if name in FOUR_BIT:
        assert t.packed and t.data.numel() == x.numel() // 2
        assert int(codes.max()) <= 15 and int(codes.min()) >= 0
    fmt = spec.number_format
    lo, hi = fmt.code_range(spec)
    assert lo <= int(codes.min()) and int(codes.max()) <= hi


def test_bits_per_weight_includes_the_scales():
    assert lb.QuantSpec(format="nf4").bits_per_weight == 4 + 32 / 64
    assert lb.QuantSpec(format="nf4_dq").bits_per_weight == pytest.approx(4 + 8 / 64 + 64 / (64 * 256))
    assert lb.QuantSpec(format="mxfp4").bits_per_weight == 4.25
    assert lb.QuantSpec(format="mxfp8").bits_per_weight == 8.25
    assert lb.QuantSpec(format="nvfp4").bits_per_weight == 4.5
    assert lb.QuantSpec(bits=4, granularity=lb.PerGroup(32)).bits_per_weight == 5.0


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("observer", ["minmax", "mse", "percentile"])
def test_observers_choose_scales_for_every_format(name, observer):
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(4))
    x[0, 0] = 40.0                                        # an outlier: clipping it pays off
    spec = lb.QuantSpec(format=name)
    scale, zp = ops.choose_qparams(x, spec, observer=observer)
    assert bool((scale > 0).all()) and not zp.any()
    err = ops.quant_error(x, spec, scale, zp)
    base = ops.quant_error(x, spec, *ops.choose_qparams(x, spec, observer="minmax"))
    assert err.mse <= base.mse * (1 + 1e-9) or observer == "percentile"
    # streaming observers agree in kind with the one-shot form
    from lowbit import observers

    obs = {"minmax": observers.MinMax, "mse": observers.MSE, "percentile": observers.Percentile}[observer](spec)
    obs.update(x)
    s2, z2 = obs.qparams()
    assert s2.shape == scale.shape and bool((s2 > 0).all()) and not z2.any()
    if observer == "mse" and name.startswith("fp8"):
        assert ops.quant_error(x, spec, s2, z2).mse <= base.mse * 1.01


def test_mx_scales_are_powers_of_two():
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(5)) * 100
    for name in ("mxfp4", "mxfp8", "mxint8"):
        s, _ = ops.choose_qparams(x, lb.QuantSpec(format=name))
        m, _ = torch.frexp(s)
        assert bool((m == 0.5).all())


def test_nvfp4_block_scales_are_fp8_times_one_tensor_scale():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    s, _ = ops.choose_qparams(x, lb.QuantSpec(format="nvfp4"))
    g = (x.reshape(4, 4, 16).abs().amax(dim=2) / 6).max() / 448
    ratio = s / g
    e4m3 = ratio.to(torch.float8_e4m3fn).float()
    assert torch.allclose(e4m3, ratio, rtol=1e-6, atol=0)    # every block scale is an E4M3 number times g


@pytest.mark.parametrize("name", NEW)
def test_qat_gradients_go_straight_through(name):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(7)).requires_grad_()
    spec = lb.QuantSpec(format=name)
    scale, zp = ops.choose_qparams(x.detach(), spec)
    scale = (scale * 0.5).requires_grad_()               # some elements saturate
    y = ops.fake_quantize(x, spec, scale, zp, ste="clipped")
    g = torch.randn_like(y)
    y.backward(g)
    inside = ~spec.number_format.saturated(ops.params.broadcast_param(0, x.shape, spec) if False else
                                          x.detach() / ops.params.broadcast_param(scale.detach(), x.shape, spec))
    assert torch.equal(x.grad, g * inside)
    assert scale.grad is not None and scale.grad.shape == scale.shape and bool(torch.isfinite(scale.grad).all())
    # identity STE
    x.grad = None
    ops.fake_quantize(x, spec, scale.detach(), zp).backward(g)
    assert torch.equal(x.grad, g)


def test_qat_trains_an_nf4_model():
    torch.manual_seed(0)
    model = _model()
    q = lb.quantize(model, weights=lb.QuantSpec(format="nf4"))
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    x = torch.randn(64, 64)
    target = model(x).detach() * 0.5
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(q(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_stochastic_rounding_is_unbiased_on_a_table():
    spec = lb.QuantSpec(format="mxfp4", rounding="stochastic")
    x = torch.full((32,), 2.5)                            # between 2 and 3, X = 2^(1-2) = 0.5: v = 5, between 4 and 6
    s, z = ops.choose_qparams(x, spec)
    g = torch.Generator().manual_seed(0)
    ys = torch.stack([ops.fake_quantize(x, spec, s, z, generator=g) for _ in range(400)])
    assert set(ys.unique().tolist()) == {2.0, 3.0}
    assert abs(float(ys.mean()) - 2.5) < 0.03


def test_spec_validation_names_the_argument():
    with pytest.raises(ValueError, match="format must be one of"):
        lb.QuantSpec(format="fp9")
    with pytest.raises(TypeError, match="format"):
        lb.QuantSpec(format=8)
    with pytest.raises(ValueError, match=r"granularity must be PerGroup\(32\)"):
        lb.QuantSpec(format="mxfp4", granularity=lb.PerChannel(0))
    with pytest.raises(ValueError, match="bits"):
        lb.QuantSpec(format="nf4", bits=3)
    with pytest.raises(ValueError, match="symmetric"):
        lb.QuantSpec(format="fp8_e4m3", symmetric=False)
    with pytest.raises(ValueError, match="qmin describes integer grids"):
        lb.QuantSpec(format="nf4").qmin
    assert lb.QuantSpec(format="nf4").bits == 4 and lb.QuantSpec(format="fp8_e4m3").granularity == lb.PerTensor()
    assert lb.QuantSpec(bits=4).replace(format="mxfp4") == lb.QuantSpec(format="mxfp4")
    assert str(lb.QuantSpec(format="nf4")) == "nf4/PerGroup(64,-1)"
    assert lb.QuantSpec() == lb.QuantSpec(bits=8, granularity=lb.PerTensor(), format="int")


def test_nan_handling():
    x = torch.tensor([1.0, float("nan"), -2.0, 0.5])
    fp8 = lb.QuantSpec(format="fp8_e4m3")
    codes = ops.quantize(x, fp8, 1.0, 0)                  # FP8 holds NaN
    assert torch.isnan(ops.dequantize(codes, fp8, 1.0, 0)[1])
    nf4 = lb.QuantSpec(format="nf4", granularity=lb.PerTensor())
    with pytest.raises(ValueError, match="NaN"):
        ops.quantize(x, nf4, 2.0, 0)
    assert torch.isnan(ops.fake_quantize(x, nf4, 2.0, 0)[1])


def test_non_int_zero_point_is_rejected():
    x = torch.randn(16)
    with pytest.raises(ValueError, match="zero_point"):
        ops.quantize(x, lb.QuantSpec(format="fp8_e4m3"), 1.0, 3)


def test_registry_lists_every_builtin():
    assert set(formats.names()) >= {"int", *NEW}
    for name in formats.names():
        f = formats.get(name)
        assert f.name == name and f.reference


@pytest.mark.parametrize("name", ["nf4", "mxfp4", "fp8_e4m3"])
def test_analyze_splits_clip_and_round_per_format(name):
    torch.manual_seed(0)
    model = _model()
    x = torch.randn(32, 64)
    w, a = _specs(name)
    q = lb.quantize(model, weights=w, activations=a)
    if a is not None:
        with lb.calibrate(q):
            q(x)
    report = lb.analyze(model, q, [x])
    layer = q[0]
    scale, zp = layer.weight_quant.qparams(layer.weight)
    err = ops.quant_error(model[0].weight.detach(), w, scale, zp)
    d = report.as_dict() if hasattr(report, "as_dict") else report.to_dict()
    # the clip/round split of the report is the format's: clip = beyond the format's largest value
    flat = _find(d, "clip_mse")
    assert any(abs(v - err.clip_mse) <= 1e-12 + 1e-6 * err.mse for v in flat)
    assert err.clip_mse + err.round_mse == pytest.approx(err.mse)


def _find(obj, key):
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, float):
                out.append(v)
            else:
                out += _find(v, key)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += _find(v, key)
    return out
