"""transformers' Conv1D (weight stored [in, out]) exports as the linear layer it is; ONNX Runtime agrees."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.export import export_onnx

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


@pytest.mark.parametrize("weights,acts", [(lb.QuantSpec(8, granularity=lb.PerChannel(0)), lb.QuantSpec(8, symmetric=False)),
                                          (lb.QuantSpec(4, granularity=lb.PerGroup(16)), None)])
def test_conv1d_exports_and_ort_agrees(weights, acts, tmp_path, helpers):
    torch.manual_seed(0)
    m = nn.Sequential(Conv1D(24, 32), nn.GELU(), Conv1D(32, 24))
    x = torch.randn(4, 6, 32)
    q = lb.quantize(m, weights=weights, activations=acts)
    if acts is not None:
        with lb.calibrate(q):
            q(x)
    lb.freeze(q)
    path = tmp_path / "m.onnx"
    info = export_onnx(q, x, path)
    assert sorted(info.layers) == ["0", "2"]
    y = torch.from_numpy(helpers.run_onnx(path, x)[0])
    with torch.no_grad():
        ref = q(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
