"""lowbit.integer.fast: int8 GEMMs (torch) or ONNX Runtime, the frozen model's outputs to float rounding."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.integer import FastLinear, fast

U = 2.0 ** -24
W8 = lb.QuantSpec(8, granularity=lb.PerChannel(0))
ACTS = {
    "token-sym": lb.QuantSpec(8, dynamic=True, granularity=lb.PerToken()),
    "token-uint-asym": lb.QuantSpec(8, signed=False, symmetric=False, dynamic=True, granularity=lb.PerToken()),
    "tensor-dynamic": lb.QuantSpec(8, dynamic=True),
    "static-asym": lb.QuantSpec(8, symmetric=False),
    "static-uint-sym": lb.QuantSpec(8, signed=False),
    "token-6bit-narrow": lb.QuantSpec(6, narrow_range=True, dynamic=True, granularity=lb.PerToken()),
}


def _model(layers: int = 1):
    torch.manual_seed(0)
    if layers == 1:
        return nn.Sequential(nn.Linear(48, 96))
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 8))


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 2


def _frozen(model, x, acts, weights=W8):
    q = lb.quantize(model, weights=weights, activations=acts)
    if acts is not None and not acts.dynamic:
        with lb.calibrate(q):
            q(x)
    return lb.freeze(q)


def _bound(q, x):
    """Two float32 evaluations of the same products of the same codes differ by at most
    ``2 gamma_K sum_k |x_k w_k|`` plus the roundings of scaling and bias (Higham, 3.1)."""
    with torch.no_grad():
        h = q[0].input_quant(x)
        m = h.abs() @ q[0].weight.abs().t()
    k = h.shape[-1]
    return (2 * k + 8) * U * (m + q[0].bias.abs()) + 1e-12


@pytest.mark.parametrize("name", list(ACTS))
def test_torch_backend_matches_frozen(name):
    x = _x(3, 7, 48)
    q = _frozen(_model(), x, ACTS[name])
    f = fast(q, backend="torch")
    assert f.lowbit_fast["int8"] == ["0"] and isinstance(f[0], FastLinear)
    with torch.no_grad():
        y, ref = f(x), q(x)
    # identical codes (same grid, same division), exact int32 products: only float rounding differs
    assert bool(((y - ref).abs() <= _bound(q, x)).all())
    assert f(x[:0]).shape == (0, 7, 96)


def test_weight_only_and_grouped_layers_run_float_with_weights_dequantized_once():
    x = _x(4, 48)
    q = _frozen(_model(2), x, None, lb.QuantSpec(4, granularity=lb.PerGroup(16)))
    f = fast(q, backend="torch")
    assert f.lowbit_fast["int8"] == [] and set(f.lowbit_fast["float"]) == {"0", "2"}
    with torch.no_grad():
        torch.testing.assert_close(f(x), q(x), rtol=0, atol=0)


def _bias_step(q, x):
    """to_integer adds the bias rounded to the accumulator's grid ``s_x s_w`` (as integer kernels
    do): at most half a step, ``s_x s_w / 2``, from the float bias."""
    aq = q[0].input_quant
    if aq.spec.dynamic:
        s, _ = lb.ops.choose_qparams(x.detach(), aq.spec, "minmax")
        s = s.reshape(*x.shape[:-1], 1) if s.numel() > 1 else s.reshape(())
    else:
        s = aq.scale.reshape(())
    return 0.5 * s * q[0].weight_scale.reshape(-1)


@pytest.mark.parametrize("int8_format", [None, "u8s8", "u8u8"])
@pytest.mark.parametrize("name", ["token-sym", "token-uint-asym", "static-asym"])
def test_ort_backend_matches_frozen(name, int8_format, monkeypatch):
    """Every int8 format the ORT backend can run (the one lowbit picks here, and each forced one)
    gives the frozen model's outputs and lowbit.integer.to_integer's (exact int32 accumulators) to
    float32 rounding."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    monkeypatch.delenv("LOWBIT_INT8_FORMAT", raising=False)
    x = _x(3, 7, 48)
    q = _frozen(_model(), x, ACTS[name])
    f = fast(q, backend="ort", example_inputs=x, threads=1, int8_format=int8_format)
    reference = lb.integer.to_integer(q)
    x2 = _x(5, 4, 48)
    for xx in (x, x2):                                               # other batch and sequence sizes
        with torch.no_grad():
            y, ref, exact = f(xx), q(xx), reference(xx)
        assert bool(((y - ref).abs() <= _bound(q, xx)).all())
        assert bool(((y - exact).abs() <= _bound(q, xx) + _bias_step(q, xx)).all())


def test_bad_input():
    x = torch.randn(2, 48)
    q = lb.quantize(_model(), weights=W8)
    with pytest.raises(ValueError, match="not frozen"):
        fast(q)
    lb.freeze(q)
    with pytest.raises(ValueError, match="backend"):
        fast(q, backend="tpu")
    with pytest.raises(ValueError, match="example_inputs"):
        fast(q, backend="ort")
    with pytest.raises(ValueError, match="no quantized layer"):
        fast(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="int8_format"):
        fast(q, int8_format="s8s8")
    assert x.shape == (2, 48)


def test_auto_picks_onnx_runtime_when_it_can_export():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lowbit.export import OrtModule

    x = _x(2, 3, 48)
    q = _frozen(_model(), x, ACTS["token-sym"])
    assert isinstance(fast(q, example_inputs=x, threads=1), OrtModule)
    assert isinstance(fast(q)[0], FastLinear)           # nothing to trace with: torch
