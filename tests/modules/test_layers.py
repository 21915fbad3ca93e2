import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit import ops
from lowbit.modules import QuantConv1d, QuantConv2d, QuantLinear

W4G = lb.QuantSpec(bits=4, granularity=lb.PerGroup(4))
A8 = lb.QuantSpec(bits=8, symmetric=False)


def _reference(x, w, spec_w, spec_a, a_qparams):
    flat = w.reshape(w.shape[0], -1)
    s, z = ops.choose_qparams(flat, spec_w)
    wq = ops.fake_quantize(flat, spec_w, s, z).reshape(w.shape)
    return ops.fake_quantize(x, spec_a, *a_qparams), wq


@pytest.mark.parametrize("make,x", [
    (lambda: nn.Linear(12, 5), torch.randn(7, 12)),
    (lambda: nn.Conv1d(3, 6, 3, padding=1, bias=False), torch.randn(2, 3, 10)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), torch.randn(2, 4, 9, 9)),
    (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), torch.randn(1, 2, 6, 6)),
])
def test_layer_equals_float_op_on_fake_quantized_operands(make, x):
    torch.manual_seed(0)
    f = make()
    cls = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}[type(f)]
    q = cls.from_float(f, W4G, A8)
    a_qparams = ops.choose_qparams(x, A8)
    q.input_quant.set_qparams(*a_qparams)
    xq, wq = _reference(x, f.weight.detach(), W4G, A8, a_qparams)
    old_weight = f.weight
    f.weight = nn.Parameter(wq)
    expected = f(xq)
    f.weight = old_weight
    assert torch.allclose(q(x), expected, atol=1e-6)


def test_freeze_keeps_outputs_and_drops_the_float_weight():
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(32, 8), W4G, None)
    x = torch.randn(3, 32)
    before = q(x)
    q.freeze()
    assert "weight" not in dict(q.named_parameters())
    assert q.weight_codes.dtype == torch.uint8 and q.weight_codes.numel() == 32 * 8 // 2  # packed 4-bit
    assert torch.equal(q(x), before)
    assert q.weight.shape == (8, 32)


def test_gradients_reach_the_float_master_weight():
    torch.manual_seed(0)
    f = nn.Linear(6, 3)
    q = QuantLinear.from_float(f, W4G, None)
    q(torch.randn(4, 6)).sum().backward()
    assert f.weight.grad is not None and f.weight.grad.abs().sum() > 0
