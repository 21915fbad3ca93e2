"""ort_module / OrtModule: ONNX Runtime called like the torch model, same output structure."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.export import ort_module, session_options

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(32, 64)
        self.a = nn.Linear(64, 4)
        self.b = nn.Linear(64, 3)

    def forward(self, x, *, scale: float = 1.0):
        h = torch.relu(self.body(x))
        return {"a": self.a(h) * scale, "b": self.b(h)}


def test_same_structure_and_values(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 32)
    q = lb.freeze(lb.quantize(TwoHeads(), weights=lb.QuantSpec(4, granularity=lb.PerGroup(16))))
    q.train()
    m = ort_module(q, (x,), path=tmp_path / "two.onnx", threads=1)
    assert q.training                              # the user's model is left as it was
    q.eval()
    assert (tmp_path / "two.onnx").exists() and m.input_names == ["x"]
    x2 = torch.randn(9, 32)
    out = m(x2, return_dict=True)                  # unknown keyword arguments are ignored
    with torch.no_grad():
        ref = q(x2)
    assert isinstance(out, dict) and list(out) == ["a", "b"]
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        m()


def test_exact_flag_controls_matmulnbits_activation_rounding():
    """ONNX Runtime's default accuracy_level 4 quantizes MatMulNBits activations to int8 per block:
    not lowbit's model; exact=True keeps float32 activations."""
    torch.manual_seed(0)
    x = torch.randn(16, 256)
    q = lb.freeze(lb.quantize(nn.Sequential(nn.Linear(256, 64)), weights=lb.QuantSpec(4, granularity=lb.PerGroup(32))))
    with torch.no_grad():
        ref = q(x)
    exact = ort_module(q, x, threads=1)(x)
    approx = ort_module(q, x, threads=1, exact=False)(x)
    assert float((exact - ref).abs().max()) < 1e-4
    assert float((approx - ref).abs().max()) > 10 * float((exact - ref).abs().max())


def test_threads_must_be_positive():
    with pytest.raises(ValueError, match="threads"):
        session_options(threads=0)
