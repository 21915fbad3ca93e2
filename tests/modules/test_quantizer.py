import pytest
import torch

import lowbit as lb
from lowbit import ops
from lowbit.modules import ActQuantizer, WeightQuantizer

W8 = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))


def test_weight_quantizer_is_fake_quantize_of_the_gemm_view():
    w = torch.randn(6, 3, 2, 2)
    wq = WeightQuantizer(lb.QuantSpec(bits=4, granularity=lb.PerGroup(5)))
    flat = w.reshape(6, 12)
    s, z = ops.choose_qparams(flat, wq.spec)
    expected = ops.fake_quantize(flat, wq.spec, s, z).reshape(w.shape)
    assert torch.equal(wq(w), expected)


def test_weight_quantizer_refits_after_an_in_place_update_only():
    w = torch.nn.Parameter(torch.randn(4, 8))
    wq = WeightQuantizer(W8)
    s1, _ = wq.qparams(w)
    s1_again, _ = wq.qparams(w)
    assert s1_again is s1  # cached
    with torch.no_grad():
        w.mul_(3.0)  # an optimizer step is an in-place update like this one
    s2, _ = wq.qparams(w)
    assert torch.allclose(s2, s1 * 3.0)


def test_fixed_qparams_do_not_follow_the_weight():
    w = torch.randn(4, 8)
    wq = WeightQuantizer(W8)
    s, z = ops.choose_qparams(w, W8)
    wq.fix_qparams(s * 2, z)
    assert torch.equal(wq.qparams(w * 5)[0], s * 2)


def test_weight_gradient_is_straight_through():
    w = torch.randn(4, 8, requires_grad=True)
    WeightQuantizer(W8)(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_act_quantizer_states():
    spec = lb.QuantSpec(bits=8, symmetric=False)
    aq = ActQuantizer(spec)
    x = torch.randn(16, 5) * 3
    assert torch.equal(aq(x), x)  # uncalibrated: float pass-through
    aq.start_observing()
    assert torch.equal(aq(x), x) and torch.equal(aq(x * 2), x * 2)
    assert aq.finish_observing()
    s, z = ops.choose_qparams(torch.cat([x, x * 2]), spec)  # independent: one-shot on all data
    assert torch.equal(aq.scale, s) and torch.equal(aq.zero_point, z)
    assert torch.equal(aq(x), ops.fake_quantize(x, spec, s, z))


def test_dynamic_per_token_quantizes_each_row_on_its_own():
    spec = lb.QuantSpec(bits=8, granularity=lb.PerToken(), dynamic=True)
    aq = ActQuantizer(spec)
    x = torch.randn(2, 7, 16)
    x[0, 0] *= 100  # an outlier token must not coarsen the others
    y = aq(x)
    for b in range(2):
        for t in range(7):
            row = x[b, t]
            s = row.abs().max() / 127
            assert torch.allclose(y[b, t], torch.round(row / s).clamp(-128, 127) * s)


def test_stochastic_rounding_only_while_training():
    spec = lb.QuantSpec(bits=4, rounding="stochastic")
    aq = ActQuantizer(spec)
    aq.set_qparams(torch.tensor(0.1), torch.tensor(0, dtype=torch.int32))
    x = torch.full((1000,), 0.05)  # exactly half a step: nearest-even gives 0
    aq.eval()
    assert torch.equal(aq(x), torch.zeros_like(x))
    aq.train()
    aq.generator = torch.Generator().manual_seed(0)
    ups = (aq(x) > 0).float().mean()
    assert 0.4 < ups < 0.6


@pytest.mark.parametrize("kwargs,match", [
    ({"spec": lb.QuantSpec(granularity=lb.PerToken())}, "dynamic"),
    ({"spec": lb.QuantSpec(), "observer": "nope"}, "observer"),
    ({"spec": lb.QuantSpec(), "ste": "sometimes"}, "ste"),
])
def test_bad_act_quantizer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActQuantizer(**kwargs)


def test_inference_reuses_the_fake_quantized_weight_until_the_weight_changes():
    w = torch.nn.Parameter(torch.randn(8, 16))
    wq = WeightQuantizer(lb.QuantSpec(bits=4, granularity=lb.PerGroup(4)))
    with torch.no_grad():
        first = wq(w)
        assert wq(w) is first  # cached
        expected = ops.fake_quantize(w.detach(), wq.spec, *ops.choose_qparams(w.detach(), wq.spec))
        assert torch.equal(first, expected)
        w.add_(1.0)  # an optimizer step
        second = wq(w)
    assert second is not first
    assert torch.equal(second, ops.fake_quantize(w.detach(), wq.spec, *ops.choose_qparams(w.detach(), wq.spec)))
    y = wq(w)  # with grad enabled: a fresh differentiable tensor
    assert y.requires_grad and y is not second


@pytest.mark.parametrize("granularity,match", [(lb.PerChannel(), "batch axis"), (lb.PerGroup(4), "static PerGroup")])
def test_static_activation_granularity_on_the_batch_axis_is_refused(granularity, match):
    with pytest.raises(ValueError, match=match):
        lb.quantize(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                    activations=lb.QuantSpec(bits=8, granularity=granularity))
    q = lb.quantize(torch.nn.Sequential(torch.nn.Linear(8, 8)),                  # the feature axis is fine
                    activations=lb.QuantSpec(bits=8, granularity=lb.PerChannel(-1)))
    with lb.calibrate(q):
        q(torch.randn(4, 8))
    assert q[0].input_quant.scale.shape == (8,)
    assert q(torch.randn(3, 8)).shape == (3, 8)                                 # another batch size works
