"""What a float layer is: transformers' Conv1D, subclasses of nn.Linear / nn.Conv2d, shared modules.

Oracles: ``ops.fake_quantize`` of the weight's GEMM view with ``ops.choose_qparams`` (computed here,
independently of the module), ``torch.nn.functional.linear`` / ``conv2d``.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit as lb
from lowbit import ops
from lowbit.modules import QuantConv1D, QuantConv2d, QuantLinear, quant_class_for

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


class MyLinear(nn.Linear):
    """A subclass that keeps nn.Linear's forward (e.g. a marker class)."""


class SameLinear(nn.Linear):
    def forward(self, x):           # overridden, same function
        return super().forward(x)


class DoubledLinear(nn.Linear):
    def forward(self, x):           # overridden, another function
        return 2 * F.linear(x, self.weight, self.bias)


class MyConv(nn.Conv2d):
    pass


def _fq(w2d: torch.Tensor, spec: lb.QuantSpec) -> torch.Tensor:
    s, z = ops.choose_qparams(w2d, spec, "minmax")
    return ops.fake_quantize(w2d, spec, s, z)


@pytest.mark.parametrize("spec", [lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)),
                                  lb.QuantSpec(bits=4, granularity=lb.PerGroup(16))])
def test_hf_conv1d_quantized_per_output_feature(spec):
    torch.manual_seed(0)
    layer = Conv1D(24, 48)                       # nf=24 outputs, nx=48 inputs; weight [48, 24]
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-2, 1, 24))   # output columns of very different ranges
        layer.bias.normal_()
    m = nn.Sequential(layer)
    q = lb.quantize(m, weights=spec)
    assert isinstance(q[0], QuantConv1D) and q[0].in_features == 48 and q[0].out_features == 24
    x = torch.randn(3, 5, 48)
    want = F.linear(x, _fq(layer.weight.detach().t(), spec), layer.bias)   # scales per output feature
    with torch.no_grad():
        torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
        if isinstance(spec.granularity, lb.PerChannel):
            assert q[0].weight_quant.qparams(q[0].weight)[0].numel() == 24
        lb.freeze(q)
        torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
    assert layer.weight.shape == (48, 24)        # the float layer is untouched


def test_linear_subclasses():
    torch.manual_seed(0)
    m = nn.Sequential(MyLinear(8, 8), SameLinear(8, 8), DoubledLinear(8, 8), nn.Sequential(MyConv(2, 2, 3)))
    assert quant_class_for(m[0])[0] is QuantLinear
    assert quant_class_for(m[1])[0] is QuantLinear
    cls, why = quant_class_for(m[2])
    assert cls is None and "DoubledLinear overrides Linear.forward" in why
    assert quant_class_for(m[3][0])[0] is QuantConv2d


def test_subclass_quantized_and_other_function_reported(caplog, tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(MyLinear(8, 8), nn.ReLU(), DoubledLinear(8, 8))
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        q = lb.quantize(m)
    assert isinstance(q[0], QuantLinear) and type(q[2]) is DoubledLinear
    cov = lb.coverage(q)
    assert cov.linear_like_float == ["2"] and "computes another function" in cov.float["2"]
    assert any("Linear-like layers stay float" in r.message and "2:" in r.message for r in caplog.records)
    lb.freeze(q)
    path = lb.save(q, tmp_path / "q.safetensors")
    q2 = lb.load(path, m)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_module_on_two_paths_is_replaced_on_both():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    m = nn.Sequential(shared, nn.ReLU(), shared)
    q = lb.quantize(m)
    assert isinstance(q[0], QuantLinear) and q[2] is q[0]
    assert lb.coverage(q).aliases == {"2": "0"}
    x = torch.randn(3, 8)
    w = _fq(shared.weight.detach(), lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)))
    want = F.linear(F.relu(F.linear(x, w, shared.bias)), w, shared.bias)
    with torch.no_grad():
        torch.testing.assert_close(q(x), want)
