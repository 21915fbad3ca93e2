"""nn.ConvTranspose1d/2d through the layer protocol: quantize, calibrate, GPTQ, freeze, save/load,
ONNX (run by ONNX Runtime), the integer path's named float fallback, BN folding, equalization,
bias correction and the certified bound. Oracles: torch's own ConvTranspose, per-output-channel
fake quantization of slices of the native ``[in, out/groups, k...]`` weight, ONNX Runtime."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit as lb
from lowbit.modules import QUANT_TYPES, layer_class, quant_class_for
from lowbit.modules.conv_transpose import QuantConvTranspose1d, QuantConvTranspose2d

# (nd, in, out, kernel, stride, padding, output_padding, dilation, groups)
GEOMETRIES = [(1, 6, 4, 3, 2, 1, 1, 1, 1), (1, 4, 6, 4, 3, 2, 0, 2, 2), (2, 6, 4, 3, 2, 1, 1, 1, 1),
              (2, 4, 6, (3, 2), (2, 1), (1, 0), (1, 0), (1, 2), 2), (2, 6, 6, 3, 1, 3, 0, 1, 3)]


def _layer(nd, cin, cout, k, s, p, op, d, g, bias=True):
    torch.manual_seed(0)
    cls = nn.ConvTranspose1d if nd == 1 else nn.ConvTranspose2d
    return cls(cin, cout, k, stride=s, padding=p, output_padding=op, dilation=d, groups=g, bias=bias)


def _input(layer, n=3, size=7):
    return torch.randn((n, layer.in_channels) + (size,) * (layer.weight.dim() - 2), generator=torch.Generator().manual_seed(1))


def _per_out_channel_fake_quant(w: torch.Tensor, groups: int, spec: lb.QuantSpec) -> torch.Tensor:
    """The native weight [in, out/g, k...] with every output channel's slice fake-quantized on its own grid."""
    out = w.clone()
    ig = w.shape[0] // groups
    spec = spec.replace(granularity=lb.PerTensor())
    for g in range(groups):
        for j in range(w.shape[1]):
            piece = w[g * ig:(g + 1) * ig, j]
            scale, zp = lb.ops.choose_qparams(piece, spec)
            out[g * ig:(g + 1) * ig, j] = lb.ops.fake_quantize(piece, spec, scale, zp)
    return out


def test_registered_without_a_line_elsewhere():
    assert QUANT_TYPES[nn.ConvTranspose1d] is QuantConvTranspose1d
    assert QUANT_TYPES[nn.ConvTranspose2d] is QuantConvTranspose2d
    m = nn.ConvTranspose2d(2, 3, 3)
    assert quant_class_for(m) == (QuantConvTranspose2d, None) and layer_class(m) is QuantConvTranspose2d

    class Sub(nn.ConvTranspose2d):   # a subclass keeping the forward is the layer it derives from
        pass

    assert quant_class_for(Sub(2, 3, 3))[0] is QuantConvTranspose2d


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_forward_is_conv_transpose_of_per_output_channel_fake_quantized_weight(geo):
    m = _layer(*geo)
    spec = lb.QuantSpec(bits=4, granularity=lb.PerChannel(0))
    q = lb.quantize(nn.Sequential(m), weights=spec)
    assert isinstance(q[0], (QuantConvTranspose1d, QuantConvTranspose2d))
    x = _input(m)
    wq = _per_out_channel_fake_quant(m.weight.detach(), m.groups, spec)
    conv = F.conv_transpose1d if geo[0] == 1 else F.conv_transpose2d
    ref = conv(x, wq, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    with torch.no_grad():
        got = q(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(m(x), nn.Sequential(m)(x))   # the float model is untouched


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_gemm_inputs_times_gemm_weight_is_the_output(geo):
    m = _layer(*geo, bias=False)
    q = lb.quantize(nn.Sequential(m), weights=lb.QuantSpec(bits=8))[0]
    x = _input(m)
    cols = q.gemm_inputs(x)                                   # [g, n*L, in/g * k]
    w = q.weight.detach().reshape(m.out_channels, -1)         # the GEMM view: rows are output channels
    g, og = m.groups, m.out_channels // m.groups
    with torch.no_grad():
        y = m(x)                                              # the float layer computes with its own weight
    n, length = y.shape[0], y[0, 0].numel()
    got = torch.stack([cols[i] @ w[i * og:(i + 1) * og].t() for i in range(g)])       # [g, n*L, og]
    got = got.reshape(g, n, length, og).permute(1, 0, 3, 2).reshape(y.shape)
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)


def test_output_size_argument_is_honoured():
    m = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    q = lb.quantize(nn.Sequential(m), weights=lb.QuantSpec(bits=8))[0]
    x = torch.randn(1, 3, 5, 5)
    y = q(x, output_size=[10, 10])
    assert y.shape == m(x, output_size=[10, 10]).shape == (1, 2, 10, 10)


class _Decoder(nn.Module):
    def __init__(self, groups=2):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1, groups=groups)
        self.up1 = nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1)

    def forward(self, x):
        h = torch.relu(self.up(torch.relu(self.conv(x))))
        return self.up1(h.mean(dim=2))


def _data(n=4):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 3, 6, 6, generator=g) for _ in range(n)]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_full_workflow_calibrate_gptq_freeze_save_load(tmp_path):
    torch.manual_seed(0)
    model = _Decoder().eval()
    data = _data()
    spec = lb.QuantSpec(bits=3, granularity=lb.PerChannel(0))
    rtn = lb.quantize(model, weights=spec)
    q = lb.quantize(model, weights=spec)
    report = lb.gptq(q, data)
    assert {"up", "up1"} <= {layer.name for layer in report.layers}
    with torch.no_grad():
        ref = [model(x) for x in data]
        err_rtn = sum(_rel(rtn(x), r) for x, r in zip(data, ref))
        err_gptq = sum(_rel(q(x), r) for x, r in zip(data, ref))
    assert err_gptq < err_rtn                                  # GPTQ minimizes the output error on these inputs

    qa = lb.quantize(model, weights=lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)),
                     activations=lb.QuantSpec(bits=8, symmetric=False))
    with lb.calibrate(qa):
        for x in data:
            qa(x)
    lb.freeze(qa)
    with torch.no_grad():
        y = qa(data[0])
    assert _rel(y, ref[0]) < 0.05
    path = tmp_path / "m.safetensors"
    lb.save(qa, path)
    back = lb.load(path, _Decoder())
    assert isinstance(back.up, QuantConvTranspose2d) and back.up.frozen
    with torch.no_grad():
        assert torch.equal(back(data[0]), y)


@pytest.mark.parametrize("groups,weights", [(1, lb.QuantSpec(8, granularity=lb.PerChannel(0))),
                                            (2, lb.QuantSpec(8, granularity=lb.PerChannel(0))),
                                            (1, lb.QuantSpec(8)),
                                            (2, lb.QuantSpec(4, granularity=lb.PerGroup(8)))])
def test_onnx_export_runs_in_onnxruntime(groups, weights, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx
    import onnxruntime as ort

    model = _Decoder(groups).eval()
    data = _data(2)
    q = lb.quantize(model, weights=weights, activations=lb.QuantSpec(bits=8, symmetric=False))
    with lb.calibrate(q):
        for x in data:
            q(x)
    lb.freeze(q)
    path = tmp_path / "m.onnx"
    lb.export_onnx(q, data[0], path)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("ConvTranspose") == 2 and "DequantizeLinear" in ops
    if groups == 1 and isinstance(weights.granularity, lb.PerChannel):    # the kernel [in, out, k] per axis 1
        producer = {o: n for n in graph.node for o in n.output}
        dq = [producer[n.input[1]] for n in graph.node if n.op_type == "ConvTranspose"]
        assert all(d.op_type == "DequantizeLinear" and [a.i for a in d.attribute if a.name == "axis"] == [1] for d in dq)
    with torch.no_grad():
        ref = q(data[1])
    for level, tol in ((ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 1e-5), (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, None)):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: data[1].numpy()})[0])
        assert got.shape == ref.shape
        diff = (got - ref).abs()
        if tol is not None:      # the QDQ graph as written: the same arithmetic
            assert float(diff.max()) <= tol * float(ref.abs().max()) + 1e-6
        else:                    # ORT's fused integer kernels requantize: a few codes may move by one step
            assert float(diff.max()) <= 1e-2 * float(ref.abs().max())
            assert float(diff.mean()) <= 1e-3 * float(ref.abs().max())


@pytest.mark.parametrize("weights,acts", [(lb.QuantSpec(8, granularity=lb.PerChannel(0)), lb.QuantSpec(8, symmetric=False)),
                                          (lb.QuantSpec(4, granularity=lb.PerGroup(8)), lb.QuantSpec(8, symmetric=False)),
                                          (lb.QuantSpec(8), lb.QuantSpec(8, symmetric=False, dynamic=True))])
def test_integer_path_runs_the_integer_gemm_over_unfolded_codes(weights, acts):
    from lowbit.integer import IntegerGemm

    model = _Decoder().eval()
    data = _data(2)
    q = lb.quantize(model, weights=weights, activations=acts)
    with lb.calibrate(q):
        for x in data:
            q(x)
    lb.freeze(q)
    iq = lb.integer.to_integer(q)
    info = iq.lowbit_integer
    assert sorted(info.integer) == ["conv", "up", "up1"] and isinstance(iq.up, IntegerGemm)
    with torch.no_grad():
        ref, got = q(data[1]), iq(data[1])
    # exact integer accumulation against the float convolution of the same codes: float32 rounding apart,
    # or one output code where a requantized value sits on a rounding tie
    assert float((got - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
    assert float((got - ref).abs().mean()) <= 1e-4 * float(ref.abs().max())
    h = torch.relu(q.conv(data[1])).detach()
    layer = lb.integer.from_quant_layer(q.up)                 # alone, float output: float32 rounding apart
    with torch.no_grad():
        want = q.up(h)
        assert float((layer(h) - want).abs().max()) <= 2e-5 * float(want.abs().max())
    unbatched = data[1][0]
    with torch.no_grad():
        one = iq.up1(torch.relu(iq.up(torch.relu(iq.conv(unbatched)))).mean(1))     # unbatched inputs too
        torch.testing.assert_close(one, iq(unbatched[None])[0], rtol=1e-5, atol=1e-6)


def test_batchnorm_folds_into_the_output_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), nn.ReLU())
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    model.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        ref = model(x)
    folded = lb.transforms.fold_batchnorm(model)
    assert folded == [("0", "1")] and isinstance(model[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_equalization_pairs_a_transposed_conv_and_keeps_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 3, 3),
                          nn.ReLU(), nn.ConvTranspose2d(3, 4, 2, groups=1)).eval()
    with torch.no_grad():
        model[0].weight[:, 1] *= 20                           # an output channel with a wide range
    x = torch.randn(2, 4, 5, 5)
    eq = lb.transforms.equalize(model, reference=x)
    assert [(p.first, p.second) for p in eq.lowbit_equalized] == [("0", "2"), ("2", "4")]
    with torch.no_grad():
        torch.testing.assert_close(eq(x), model(x), rtol=1e-4, atol=1e-4)
    r1 = eq[0].weight.detach().abs().amax(dim=(0, 2, 3))     # output channels: axis 1 of the native weight
    assert float(r1.max() / r1.min()) < float(model[0].weight.detach().abs().amax(dim=(0, 2, 3)).max()
                                             / model[0].weight.detach().abs().amax(dim=(0, 2, 3)).min())


def test_bias_correction_matches_the_float_channel_means():
    model = _Decoder().eval()
    data = _data(2)
    q = lb.quantize(model, weights=lb.QuantSpec(bits=3, granularity=lb.PerTensor()))
    c = lb.transforms.bias_correction(q, data)          # "model" mode: each layer's means become the float ones

    def channel_means(m):
        seen = []
        h = m.up.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().double()))
        with torch.no_grad():
            for x in data:
                m(x)
        h.remove()
        return torch.cat(seen).mean(dim=(0, 2, 3))      # channels: axis 1 of the output

    want, before, after = channel_means(model), channel_means(q), channel_means(c)
    assert float((after - want).abs().max()) < 1e-4 < float((before - want).abs().max())


def test_certified_bound_covers_the_measured_change():
    from lowbit.analysis import logit_bound

    torch.manual_seed(0)
    m = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, groups=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 9 * 9, 5)).eval()
    x = torch.randn(20, 3, 5, 5)
    q = lb.quantize(m, weights=lb.QuantSpec(bits=4, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(bits=8, symmetric=False))
    with lb.calibrate(q):
        q(x)
    r = logit_bound(m, q, x)
    assert r.available, r.unsupported
    assert bool((r.measured <= r.bound).all())


def test_analyze_reports_the_layers_and_qat_trains_through_them():
    model = _Decoder().eval()
    data = _data(2)
    q = lb.quantize(model, weights=lb.QuantSpec(4, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(bits=8, symmetric=False))
    with lb.calibrate(q):
        for x in data:
            q(x)
    report = lb.analyze(model, q, data, bound=False, mdl=False, sensitivity=False)
    kinds = {row["layer"]: row["kind"] for row in report.layers}
    assert kinds["up"] == "QuantConvTranspose2d" and kinds["up1"] == "QuantConvTranspose1d"
    q.train()
    before = q.up.weight.detach().clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    loss = (q(data[0]) - model(data[0]).detach()).pow(2).mean()
    loss.backward()                                   # straight-through the weight and input rounding
    assert q.up.weight.grad is not None and q.up.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(q.up.weight.detach(), before)
