"""The layer protocol's contract, checked on every registered layer type against the float layer itself:
the GEMM view round-trips, its rows are the output channels, ``gemm_inputs`` times the GEMM view is the
layer's output, ``float_op`` is the layer's function, the probe input runs, and ``functional`` on the
weight :meth:`onnx_weight` lays out computes the layer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.modules import LAYER_CLASSES, layer_class


def _examples():
    torch.manual_seed(0)
    out = [nn.Linear(6, 4), nn.Conv1d(4, 6, 3, padding=1, groups=2), nn.Conv2d(4, 6, (3, 2), stride=2, groups=2),
           nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)]
    try:
        from transformers.pytorch_utils import Conv1D
        out.append(Conv1D(4, 6))
    except ImportError:
        pass
    return out


EXAMPLES = _examples()


def test_every_registered_type_has_an_example():
    covered = {layer_class(m) for m in EXAMPLES}
    missing = [c.__name__ for c in LAYER_CLASSES if c not in covered and c.float_name != "transformers' Conv1D"]
    assert not missing, f"add an example of {missing} to EXAMPLES"


@pytest.mark.parametrize("m", EXAMPLES, ids=lambda m: type(m).__name__)
def test_contract(m):
    cls = layer_class(m)
    gemm = cls.float_gemm_weight(m).detach()
    assert torch.equal(cls.float_weight_from_gemm(m, gemm), m.weight.detach())
    x = cls.probe_input(m, 2)
    with torch.no_grad():
        y = m(x)
        assert torch.allclose(cls.float_op(m)(x, gemm, m.bias), y, atol=1e-6)
        # a scaled row of the GEMM view scales exactly one output channel
        scaled = gemm.clone()
        scaled[1] *= 2
        y2 = cls.float_op(m)(x, scaled, None) - cls.float_op(m)(x, gemm, None)
        changed = y2.abs().movedim(cls.channel_dim, 0).reshape(gemm.shape[0], -1).amax(1) > 0
        assert changed.tolist() == [i == 1 for i in range(gemm.shape[0])]
    q = lb.quantize(nn.Sequential(m), weights=lb.QuantSpec(bits=8))[0]
    assert type(q) is cls and tuple(q.weight.shape) == tuple(gemm.shape)
    cols = q.gemm_inputs(x)                                   # [groups, n, d]
    g = cols.shape[0]
    w = q.weight.detach().reshape(gemm.shape[0], -1)
    og = w.shape[0] // g
    with torch.no_grad():
        yq = q.op(x, q.weight, None)
    got = torch.stack([cols[i] @ w[i * og:(i + 1) * og].t() for i in range(g)])   # [g, n*L, og]
    want = yq.movedim(cls.channel_dim, -1).reshape(-1, g, og).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    lb.freeze(q)
    qt = q.qweight
    codes, scale, zp, axis, to_native = q.onnx_weight(qt.int_repr(), qt.scale.float(), qt.zero_point, 1)
    wq = (codes.float() - zp.float()) * scale                 # per-tensor grid: one scale
    if to_native is not None:
        wq = to_native(wq)
    with torch.no_grad():
        torch.testing.assert_close(q.functional()(x, wq, q.bias), q(x), rtol=1e-5, atol=1e-5)
