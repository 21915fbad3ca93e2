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


@pytest.mark.parametrize("name", ["token-sym", "token-uint-asym", "static-asym"])
def test_ort_backend_matches_frozen(name):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x = _x(3, 7, 48)
    q = _frozen(_model(), x, ACTS[name])
    f = fast(q, backend="ort", example_inputs=x, threads=1)
    with torch.no_grad():
        ref = q(x)
    x2 = _x(5, 4, 48)
    with torch.no_grad():
        ref2 = q(x2)
    assert bool(((f(x) - ref).abs() <= _bound(q, x)).all())
    assert bool(((f(x2) - ref2).abs() <= _bound(q, x2)).all())      # other batch and sequence sizes


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
    assert x.shape == (2, 48)


def test_auto_picks_onnx_runtime_when_it_can_export():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lowbit.export import OrtModule

    x = _x(2, 3, 48)
    q = _frozen(_model(), x, ACTS["token-sym"])
    assert isinstance(fast(q, example_inputs=x, threads=1), OrtModule)
    assert isinstance(fast(q)[0], FastLinear)           # nothing to trace with: torch
