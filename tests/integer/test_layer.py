"""Integer layers against the fake-quantized layers and against exact float64 arithmetic."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit as lb
from lowbit import ops
from lowbit.integer import IntegerConv, IntegerLinear, from_quant_layer
from lowbit.modules import QuantConv1d, QuantConv2d, QuantLinear
from lowbit.ops.integer_math import quantize_multiplier, requantize

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")   # torch's note on even kernels

U = 2.0 ** -24     # float32 unit roundoff

W8C = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))
W8T = lb.QuantSpec(bits=8)
W4G = lb.QuantSpec(bits=4, granularity=lb.PerGroup(16))
W4G5 = lb.QuantSpec(bits=4, granularity=lb.PerGroup(5))          # partial last group
W2C = lb.QuantSpec(bits=2, granularity=lb.PerChannel(0))
W8ASYM = lb.QuantSpec(bits=8, symmetric=False, granularity=lb.PerChannel(0))   # centered codes need int32
A8 = lb.QuantSpec(bits=8, symmetric=False)
AU8 = lb.QuantSpec(bits=8, signed=False, symmetric=False)
AS8 = lb.QuantSpec(bits=8)
A16 = lb.QuantSpec(bits=16, symmetric=False)
DYN = lb.QuantSpec(bits=8, symmetric=False, dynamic=True)
TOK = lb.QuantSpec(bits=8, symmetric=False, dynamic=True, granularity=lb.PerToken())

LAYERS = {
    "linear": (lambda: nn.Linear(40, 12), lambda: torch.randn(2, 9, 40) * 2 + 0.5),
    "conv1d": (lambda: nn.Conv1d(6, 8, 5, stride=2, padding=3, dilation=2, groups=2), lambda: torch.randn(3, 6, 23)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1), lambda: torch.randn(2, 4, 9, 7).relu()),
    "conv2d_groups_reflect": (lambda: nn.Conv2d(4, 8, 3, padding=2, groups=4, padding_mode="reflect"),
                              lambda: torch.randn(2, 4, 6, 6)),
    "conv2d_same_even": (lambda: nn.Conv2d(3, 5, (2, 4), padding="same", bias=False), lambda: torch.randn(2, 3, 7, 8)),
}
CLS = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}


def _frozen(kind, wspec, aspec, seed=0):
    torch.manual_seed(seed)
    make, make_x = LAYERS[kind]
    f = make()
    x = make_x()
    q = CLS[type(f)].from_float(f, wspec, aspec)
    if not aspec.dynamic:
        q.input_quant.set_qparams(*ops.choose_qparams(x, aspec))
    q.freeze()
    return q.eval(), x


def _scales(q, x):
    """s_x * s_w broadcast to the output, and the fake-quantized operands."""
    xq = q.input_quant(x)
    if q.input_quant.spec.dynamic:
        sx, _ = ops.choose_qparams(x, q.input_quant.spec, "minmax")
    else:
        sx = q.input_quant.scale
    sw = q.weight_scale
    if sw.dim() == 2:        # per group: the largest group scale bounds the bias-free error terms
        sw = sw.amax(1)
    sw = sw.reshape(-1) if sw.dim() else sw.reshape(1)
    shape = [1] * (x.dim() - 1) + [-1] if isinstance(q, QuantLinear) else [1, -1] + [1] * (x.dim() - 2)
    return sx * sw.reshape(shape), xq


def _exact(q, x):
    """The quantized layer in float64 from the codes: x^ = (q_x - z_x) s_x, w^ = (q_w - z_w) s_w, no float32 rounding."""
    spec = q.input_quant.spec
    if spec.dynamic:
        s, z = ops.choose_qparams(x, spec, "minmax")
    else:
        s, z = q.input_quant.scale, q.input_quant.zero_point
    xs = ops.dequantize(ops.quantize(x, spec, s, z), spec, s.double(), z)
    wq = q.qweight
    ws = ops.dequantize(wq.int_repr(), wq.spec, wq.scale.double(), wq.zero_point).reshape(q._weight_shape)
    return q.op(xs, ws, None if q.bias is None else q.bias.double())


def _float_tolerance(q, x, xq):
    """|integer - fake| <= 0.5 s_x s_w (int32 bias rounding) + gamma_{K+4} (sum|x^ w^| + |b|) + u |y|."""
    k = q.weight[0].numel()
    absdot = q.op(xq.abs().double(), q.weight.abs().double(), None if q.bias is None else q.bias.abs().double())
    gamma = (k + 4) * U / (1 - (k + 4) * U)
    sxsw, _ = _scales(q, x)
    bias_term = 0.5 * sxsw if (q.bias is not None and q.weight_scale.dim() < 2) else 0.0
    return bias_term + gamma * absdot + U * absdot


CASES = [(k, w, a) for k in LAYERS for w, a in [(W8C, A8), (W8T, AU8), (W4G, A8), (W2C, AS8), (W8ASYM, AU8)]]
CASES += [("linear", W4G5, A8), ("linear", W8C, A16), ("linear", W8C, DYN), ("linear", W8C, TOK),
          ("linear", W4G, TOK), ("conv2d", W8C, DYN), ("conv1d", W4G5, AU8)]


@pytest.mark.parametrize("kind,wspec,aspec", CASES, ids=[f"{k}-{w}-{a}" for k, w, a in CASES])
def test_float_output_matches_fake_quant_within_the_derived_bound(kind, wspec, aspec):
    q, x = _frozen(kind, wspec, aspec)
    qi = from_quant_layer(q)
    y_int, y_fake = qi(x), q(x)
    assert y_int.shape == y_fake.shape and y_int.dtype == y_fake.dtype
    sxsw, xq = _scales(q, x)
    tol = _float_tolerance(q, x, xq)
    assert bool(((y_int.double() - y_fake.double()).abs() <= tol).all())
    # against exact arithmetic the only error left is the int32 bias rounding (and the final cast)
    exact = _exact(q, x)
    bias_term = 0.5 * sxsw if (q.bias is not None and q.weight_scale.dim() < 2) else 0.0
    assert bool(((y_int.double() - exact).abs() <= bias_term + 4 * U * exact.abs() + 1e-12).all())


def _accumulators(qi, x):
    """The layer's integer accumulators (the steps of its forward) for x."""
    codes, sx, zp = qi.quantize_input(x)
    if isinstance(qi, IntegerLinear):
        a, zero = qi._operand(codes.reshape(-1, x.shape[-1]), zp.reshape(-1, 1) if zp.dim() else zp)
        return qi.accumulate(a, zero), codes, zp
    a, zero = qi._operand(codes, zp)
    cols, _ = qi._im2col(qi._pad(a, zero))
    return qi.accumulate(cols, zero), codes, zp


@pytest.mark.parametrize("kind,wspec,aspec", [("conv1d", W8C, AU8), ("conv2d_groups_reflect", W8ASYM, A8),
                                              ("conv2d", W4G, A8), ("linear", W8C, A16), ("linear", W8C, TOK)])
def test_accumulators_are_exact_integer_dot_products(kind, wspec, aspec):
    q, x = _frozen(kind, wspec, aspec)
    qi = from_quant_layer(q)
    acc, codes, zp = _accumulators(qi, x)
    wq = q.qweight
    wc = (wq.int_repr().to(torch.int64) - ops.params.broadcast_param(wq.zero_point, wq.shape, wq.spec)).double()
    xc = (codes.to(torch.int64) - zp).double()                       # centered input codes
    # oracle: the layer's own float op on integer-valued float64 tensors (exact below 2^53)
    groups = [slice(None)] if qi.group_size is None else [
        slice(i, i + qi.group_size) for i in range(0, wc.shape[1], qi.group_size)]
    for g, cols in enumerate(groups):
        mask = torch.zeros_like(wc)
        mask[:, cols] = 1
        ref = q.op(xc, (wc * mask).reshape(q._weight_shape), None)
        got = acc if qi.group_size is None else acc[g]
        ref = ref.movedim(1, -1).reshape(-1, ref.shape[1]) if not isinstance(q, QuantLinear) else ref.reshape(-1, ref.shape[-1])
        assert torch.equal(got.double(), ref)


@pytest.mark.parametrize("kind,wspec,aspec", [(k, w, a) for k in LAYERS for w, a in [(W8C, AU8), (W8T, A8), (W2C, AS8)]]
                         + [("linear", W8C, TOK), ("linear", W8C, DYN)])
def test_requantized_output_is_within_one_code_of_fake_quant(kind, wspec, aspec):
    q, x = _frozen(kind, wspec, aspec)
    qi = from_quant_layer(q)
    y_fake = q(x)
    out_spec = lb.QuantSpec(bits=8, signed=False, symmetric=False)
    s_out, z_out = ops.choose_qparams(y_fake * 0.8, out_spec)         # some saturation too
    assert qi.set_output_grid(out_spec, s_out, z_out)
    q_int = qi.forward_codes(x)
    q_fake = ops.quantize(y_fake, out_spec, s_out, z_out).to(torch.int32)
    diff = (q_int - q_fake).abs()
    assert int(diff.max()) <= 1
    # codes may only differ where the fake value lies within the arithmetic's error of a rounding boundary
    sxsw, xq = _scales(q, x)
    margin = _float_tolerance(q, x, xq) / s_out.double() + 1e-6
    v = y_fake.double() / s_out.double()
    near_tie = ((v - v.floor() - 0.5).abs() <= margin)
    assert bool((diff[~near_tie] == 0).all())
    # and exactly the fixed-point requantization of the exact accumulator
    acc, _, _ = _accumulators(qi, x)
    sxsw, _ = _scales(q, x)
    sx = sxsw.reshape(-1)[0] / q.weight_scale.reshape(-1)[0] if not aspec.dynamic else None
    if sx is not None:
        m, sh = quantize_multiplier(q.input_quant.scale.double() * q.weight_scale.double().reshape(-1) / s_out.double())
        bias = 0 if q.bias is None else torch.round(q.bias.double() / (q.input_quant.scale.double()
                                                                       * q.weight_scale.double().reshape(-1))).long()
        ref = requantize(acc + bias, m, sh, z_out, out_spec.qmin, out_spec.qmax)
        got = q_int.movedim(1, -1).reshape(ref.shape) if not isinstance(q, QuantLinear) else q_int.reshape(ref.shape)
        assert torch.equal(got, ref)


def test_per_group_layers_keep_float_outputs_and_int64_when_int32_could_overflow():
    q, x = _frozen("linear", W4G, A8)
    qi = from_quant_layer(q)
    assert not qi.set_output_grid(AU8, torch.tensor(0.1), torch.tensor(0)) and qi.output_grid is None
    torch.manual_seed(0)
    big = QuantLinear.from_float(nn.Linear(4096, 3), W8C, A16)
    xb = torch.randn(2, 4096)
    big.input_quant.set_qparams(*ops.choose_qparams(xb, A16))
    big.freeze()
    qb = from_quant_layer(big)
    assert qb.acc_dtype == torch.int64                                  # 4096 * 65535 * 127 > 2^31
    assert bool(((qb(xb).double() - _exact(big, xb)).abs()
                 <= 0.5 * _scales(big, xb)[0] + 1e-6).all())


def test_layers_that_cannot_run_on_integers_say_why():
    torch.manual_seed(0)
    wo = QuantLinear.from_float(nn.Linear(4, 3), W8C, None)
    wo.freeze()
    with pytest.raises(ValueError, match="weight-only"):
        IntegerLinear(wo)
    unfrozen = QuantLinear.from_float(nn.Linear(4, 3), W8C, A8)
    with pytest.raises(ValueError, match="not frozen"):
        IntegerLinear(unfrozen)
    conv = QuantConv2d.from_float(nn.Conv2d(2, 2, 3), W8C, TOK)
    conv.freeze()
    with pytest.raises(ValueError, match="per-token"):
        IntegerConv(conv)
    with pytest.raises(ValueError, match="static per-tensor"):
        q, _ = _frozen("linear", W8C, A8)
        from_quant_layer(q).set_output_grid(TOK, torch.tensor(1.0), torch.tensor(0))


def test_unbatched_conv_input():
    q, x = _frozen("conv2d", W8C, A8)
    qi = from_quant_layer(q)
    assert torch.allclose(qi(x[0]), qi(x)[0], atol=0, rtol=0)
    assert F.mse_loss(qi(x[0]), q(x[0])) < 1e-6
