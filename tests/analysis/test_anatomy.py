import pytest
import torch

import lowbit as lb
from lowbit import ops
from lowbit.analysis import clip_sweep, error_anatomy, tensor_anatomy
from lowbit.modules import WeightQuantizer


def test_the_sweep_matches_quant_error_at_each_clipping_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g) ** 3
    spec = lb.QuantSpec(bits=4)
    ratios = (0.1, 0.25, 0.5, 1.0)
    sw = clip_sweep(x, spec, ratios)
    r = float(x.abs().max())
    for i, ratio in enumerate(ratios):   # oracle: a symmetric grid whose end code is ratio * max|x|
        scale = torch.tensor(ratio * r / spec.qmax)
        err = ops.quant_error(x, spec, scale, torch.tensor(0))
        assert sw["mse"][i] == pytest.approx(err.mse, rel=1e-6)
        assert sw["clip_mse"][i] == pytest.approx(err.clip_mse, rel=1e-6, abs=1e-15)
        assert sw["clip_fraction"][i] == pytest.approx(err.clip_fraction)
    assert sw["clip_mse"][-1] == 0.0 and sw["clip_fraction"][0] > sw["clip_fraction"][2]
    # heavy tails: the best range is well inside max|x| (the U-shaped trade-off)
    y = torch.randn(4000, generator=g)
    y[:4] = 30.0   # a few outliers
    full = clip_sweep(y, spec)
    i = min(range(len(full["mse"])), key=full["mse"].__getitem__)
    assert 0.1 < full["ratio"][i] < 0.6
    assert full["mse"][i] < 0.8 * full["mse"][-1] and full["mse"][i] < 0.8 * full["mse"][0]


def test_per_channel_sweep_and_chosen_ratio():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 50, generator=g) * torch.linspace(0.1, 3, 8).reshape(8, 1)
    spec = lb.QuantSpec(bits=4, granularity=lb.PerChannel(0))
    scale, zp = ops.choose_qparams(w, spec, "maxabs")
    t = tensor_anatomy(w, spec, scale, zp)
    assert t.chosen_ratio == pytest.approx(1.0)
    assert t.error["mse"] == pytest.approx(ops.quant_error(w, spec, scale, zp).mse)
    i = t.sweep["ratio"].index(1.0)
    assert t.sweep["mse"][i] == pytest.approx(t.error["mse"], rel=1e-6)
    # half the range: ratio 0.5 on every row
    t2 = tensor_anatomy(w, spec, scale / 2, zp)
    assert t2.chosen_ratio == pytest.approx(0.5)
    assert t2.error["clip_fraction"] > 0


def test_error_histogram_separates_rounding_from_clipping():
    x = torch.linspace(-1, 1, 10001)
    spec = lb.QuantSpec(bits=4)
    h = tensor_anatomy(x, spec, torch.tensor(1 / 7), torch.tensor(0)).histogram
    inside = [c for lo, c in zip(h["edges"], h["counts"]) if -0.5 - 1e-9 <= lo < 0.5 - 1e-9]
    assert sum(inside) == x.numel()                       # pure rounding: all within half a step
    h = tensor_anatomy(x, spec, torch.tensor(0.5 / 7), torch.tensor(0)).histogram
    outside = sum(c for lo, c in zip(h["edges"], h["counts"]) if not -0.5 - 1e-9 <= lo < 0.5 - 1e-9)
    assert outside + h["below"] + h["above"] > 0.4 * x.numel()   # clipped: errors beyond half a step


def test_layer_anatomy_of_a_model(rescnn, quantized):
    m, x, _ = rescnn
    q = quantized(m, 4, 8)
    seen = {}
    hooks = [q.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, a[0]))
             for n in ("c1", "c2", "fc")]
    anat = error_anatomy(m, q, [x])
    for h in hooks:
        h.remove()
    assert set(anat) == {"c1", "c2", "fc"}
    for name, a in anat.items():
        layer = q.get_submodule(name)
        w = WeightQuantizer.gemm_view(layer.weight.detach())
        s, z = layer.weight_quant.qparams(layer.weight)
        assert a.weight.error["mse"] == pytest.approx(ops.quant_error(w, layer.weight_quant.spec, s, z).mse)
        assert a.weight.mse_used == pytest.approx(a.weight.error["mse"], rel=1e-5)
        # the input error is measured on what the layer's activation quantizer really sees
        aq = layer.input_quant
        ref = ops.quant_error(seen[name].reshape(-1), aq.spec, aq.scale, aq.zero_point)
        assert a.input.error["mse"] == pytest.approx(ref.mse, rel=1e-6)
        assert a.input.numel == seen[name].numel()
    # frozen models give the same anatomy (the float weights come from the float model)
    lb.freeze(q)
    anat2 = error_anatomy(m, q, [x])
    assert anat2["c2"].weight.error["mse"] == pytest.approx(anat["c2"].weight.error["mse"], rel=1e-5)
