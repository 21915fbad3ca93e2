"""lb.qat.prepare on whole models: ordinary training loops, freeze equivalence, save/load, options."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit as lb
from lowbit import ops
from lowbit.modules import ActQuantizer, WeightQuantizer
from lowbit.qat import QATActQuantizer, QATWeightQuantizer


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12, 4))


def _task(n=256, seed=0):
    """Four classes told apart by where a bump sits in a length-12 signal."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 12, generator=g) * 0.3
    x[torch.arange(n), 0, y * 3 + 1] += 2.0
    return x, y


def _quantized(bits=2, act=8):
    x, _ = _task()
    q = lb.quantize(_net(), weights=lb.QuantSpec(bits=bits, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(bits=act, symmetric=False))
    with lb.calibrate(q):
        q(x[:128])
    return q


def _train(q, steps=40, lr=0.05, seed=1):
    x, y = _task(seed=seed)
    opt = torch.optim.SGD(q.parameters(), lr=lr)
    q.train()
    losses = []
    for i in range(steps):
        xb, yb = x[i % 8 * 32:(i % 8 + 1) * 32], y[i % 8 * 32:(i % 8 + 1) * 32]
        loss = F.cross_entropy(q(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_a_quantized_model_trains_with_a_plain_loop_through_the_identity_ste():
    q = _quantized()
    layer = q[3]
    x, y = _task()
    # oracle: the float linear op evaluated at the fake-quantized weight, with its own autograd
    wq = layer.weight_quant(layer.weight).detach().requires_grad_(True)
    h = q[2](q[1](q[0](x[:32]))).detach()
    ref = F.cross_entropy(F.linear(layer.input_quant(h), wq, layer.bias), y[:32])
    ref.backward()
    loss = F.cross_entropy(q(x[:32]), y[:32])
    loss.backward()
    torch.testing.assert_close(layer.weight.grad, wq.grad)         # dL/dW = dL/dW_q (identity STE)
    losses = _train(q)
    assert sum(losses[-8:]) < 0.5 * sum(losses[:8])


@pytest.mark.parametrize("options", [
    {"learn_scales": True},
    {"learn_scales": True, "rounding": "stochastic", "act_learning": "pact", "ste": "clipped"},
    {"learn_scales": True, "surrogate": "noise", "scale_init": "lsq"},
    {"learn_scales": False, "rounding": "stochastic"},
])
def test_freeze_gives_the_eval_outputs_of_the_trained_model_and_round_trips(options, tmp_path):
    q = _quantized()
    before = {k: v.clone() for k, v in lb.qat.qparams(q).items()}
    lb.qat.prepare(q, seed=0, **options)
    losses = _train(q)
    assert losses[-1] < losses[0]
    after = lb.qat.qparams(q)
    if options["learn_scales"]:
        assert not torch.equal(before["3.weight.scale"], after["3.weight.scale"])   # the steps learned
        if options.get("act_learning") != "pact":    # PACT moves only when values clip; min/max ranges clip none
            assert not torch.equal(before["3.input.scale"], after["3.input.scale"])
    x, _ = _task(64, seed=5)
    q.eval()
    with torch.no_grad():
        expected = q(x)
    with torch.enable_grad():                    # eval mode with autograd on: still the same numbers
        assert torch.equal(q(x), expected)
    lb.freeze(q)
    for _, layer in lb.quant_layers(q):
        assert type(layer.weight_quant) is WeightQuantizer and type(layer.input_quant) is ActQuantizer
    assert [n for n, _ in q.named_parameters()] == ["0.bias", "3.bias"]
    with torch.no_grad():
        assert torch.equal(q(x), expected)
    lb.save(q, tmp_path / "q.safetensors")
    q2 = lb.load(tmp_path / "q.safetensors", _net())
    with torch.no_grad():
        assert torch.equal(q2(x), expected)


def test_frozen_qat_model_is_the_ptq_integer_model_with_the_learned_grids():
    q = _quantized()
    lb.qat.prepare(q, learn_scales=True)
    _train(q, steps=10)
    grids = {k: v.clone() for k, v in lb.qat.qparams(q).items()}
    trained_float = _net()
    trained_float.load_state_dict({k: v for k, v in q.state_dict().items() if k in trained_float.state_dict()})
    lb.freeze(q)
    # PTQ of the trained float weights, given the same grids
    p = lb.quantize(trained_float, weights=lb.QuantSpec(bits=2, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(bits=8, symmetric=False))
    for name, layer in lb.quant_layers(p):
        layer.weight_quant.fix_qparams(grids[f"{name}.weight.scale"], grids[f"{name}.weight.zero_point"])
        layer.input_quant.set_qparams(grids[f"{name}.input.scale"], grids[f"{name}.input.zero_point"])
    lb.freeze(p)
    sq, sp = q.state_dict(), p.state_dict()
    assert sq.keys() == sp.keys()
    assert all(torch.equal(sq[k], sp[k]) for k in sq)
    layer = q[3]
    codes = ops.quantize(trained_float[3].weight.detach(), layer.weight_quant.spec, grids["3.weight.scale"],
                         grids["3.weight.zero_point"])
    assert torch.equal(layer.qweight.int_repr(), codes)            # the integers of ops.quantize, learned grid


def test_prepare_turns_steps_into_parameters_and_to_fixed_undoes_it():
    q = _quantized()
    n_plain = len(list(q.parameters()))
    lb.qat.prepare(q)
    assert isinstance(q[0].weight_quant, QATWeightQuantizer) and isinstance(q[0].input_quant, QATActQuantizer)
    assert len(list(q.parameters())) == n_plain + 4               # a weight step and an input step per layer
    assert lb.qat.config_of(q) == lb.qat.QATConfig()
    x, _ = _task(16)
    q.eval()
    with torch.no_grad():
        y = q(x)
    lb.qat.to_fixed(q)
    assert len(list(q.parameters())) == n_plain and lb.qat.config_of(q) is None
    with torch.no_grad():
        assert torch.equal(q(x), y)


def test_rng_state_restores_the_random_draws():
    q = _quantized()
    lb.qat.prepare(q, rounding="stochastic", surrogate="noise", seed=7)
    x, _ = _task(16)
    q.train()
    q(x)
    state = lb.qat.rng_state(q)
    with torch.no_grad():
        a = q(x)
    lb.qat.set_rng_state(q, state)
    with torch.no_grad():
        assert torch.equal(q(x), a)
    r = _quantized()
    lb.qat.prepare(r, rounding="stochastic", surrogate="noise", seed=7)
    r.train()
    r(x)
    with torch.no_grad():
        assert torch.equal(r(x), a)                               # same seed, same draws


def test_prepare_rejects_bad_input():
    q = _quantized()
    with pytest.raises(ValueError, match="rounding"):
        lb.qat.prepare(q, rounding="up")
    with pytest.raises(ValueError, match="surrogate"):
        lb.qat.prepare(q, surrogate="gumbel")
    with pytest.raises(TypeError, match="either"):
        lb.qat.prepare(q, lb.qat.QATConfig(), ste="clipped")
    uncal = lb.quantize(_net(), weights=lb.QuantSpec(bits=2), activations=lb.QuantSpec(bits=8, symmetric=False))
    with pytest.raises(ValueError, match="calibrate"):
        lb.qat.prepare(uncal)
    lb.qat.prepare(uncal, learn_scales=False)                     # weight-grid options need no calibration
    with pytest.raises(ValueError, match="lb.quantize"):
        lb.qat.prepare(_net())
    lb.freeze(q)
    with pytest.raises(ValueError, match="frozen"):
        lb.qat.prepare(q)


def test_learned_steps_stay_positive():
    q = _quantized()
    lb.qat.prepare(q)
    with torch.no_grad():
        q[0].weight_quant.scale.fill_(-1.0)                       # an optimizer step overshot
    x, _ = _task(8)
    q.train()
    assert torch.isfinite(q(x)).all()
    assert (lb.qat.qparams(q)["0.weight.scale"] > 0).all()


def test_grids_can_be_set_again_on_a_prepared_model():
    q = _quantized()
    lb.qat.prepare(q)
    x, _ = _task(64)
    with lb.calibrate(q):                                        # recalibration writes into the learned steps
        q(x * 2)
    assert isinstance(q[0].input_quant.scale, torch.nn.Parameter)
    expected, _ = ops.choose_qparams(x * 2, q[0].input_quant.spec, "minmax")
    assert torch.equal(q[0].input_quant.scale.detach(), expected.float())
    w = q[3].weight
    q[3].weight_quant.fix_qparams(torch.full((4,), 0.5), torch.zeros(4, dtype=torch.int32))  # as GPTQ does
    assert isinstance(q[3].weight_quant.scale, torch.nn.Parameter)
    assert torch.equal(lb.qat.qparams(q)["3.weight.scale"], torch.full((4,), 0.5))
    assert torch.equal(q[3].weight_quant.eval()(w), ops.fake_quantize(w, q[3].weight_quant.spec, torch.full((4,), 0.5),
                                                                     torch.zeros(4, dtype=torch.int32)))


def test_a_step_pushed_below_zero_still_gets_a_gradient():
    """LSQ steps are floored at the smallest positive float; the floor must not cut the gradient
    (with clamp_min a step that reached it would stay there for the rest of training)."""
    q = _quantized()
    lb.qat.prepare(q, learn_scales=True)
    with torch.no_grad():
        q[3].weight_quant.scale.fill_(-1e-3)                        # an optimizer step overshot
    x, y = _task(32)
    q.train()
    F.cross_entropy(q(x), y).backward()
    g = q[3].weight_quant.scale.grad
    assert g is not None and bool((g != 0).any())
