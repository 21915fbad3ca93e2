"""Encode/decode of every number format against independent references.

* FP8: torch's float8 casts (saturating: clamp to the largest finite value, then cast);
* NF4: the 16 values printed in the QLoRA paper (Dettmers et al. 2023, appendix E / the
  bitsandbytes table), written here as literals;
* MX: a reference written below from the text of the OCP MX v1.0 spec (section 6.3: shared
  exponent ``floor(log2(amax)) - emax_elem``; elements converted with roundTiesToEven, saturating),
  in plain Python arithmetic (no lowbit code);
* ONNX Runtime for FP8 QuantizeLinear/DequantizeLinear (opset 19+).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit as lb
from lowbit import formats, ops

FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}

# QLoRA (Dettmers et al., 2023), appendix E: the NF4 data type, as printed
NF4_PAPER = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def _torch_fp8_codes(v: torch.Tensor, name: str) -> torch.Tensor:
    dtype, big = FP8[name]
    return v.clamp(-big, big).to(dtype).view(torch.uint8)   # NaN stays NaN through clamp


SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-30, -1e-30, 2.0 ** -10, 2.0 ** -17, 3 * 2.0 ** -11,
            448.0, 464.0, 480.0, 500.0, 57344.0, 61440.0, 1e30, 240.0, 0.5, 1.0625, 1.125, 1.1875]


@pytest.mark.parametrize("name", list(FP8))
def test_fp8_encode_is_bit_exact_with_torch_saturating_casts(name):
    fmt = formats.get(name)
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.tensor(SPECIALS), -torch.tensor(SPECIALS),
                   torch.randn(20000, generator=g) * torch.logspace(-12, 6, 20000, base=2.0),
                   torch.randn(2000, generator=g) * fmt.max_value])
    # every midpoint between neighbouring values (the ties) and its two float32 neighbours
    vals = fmt.values().float()
    mids = (vals[1:].double() + vals[:-1].double()).div(2).float()
    v = torch.cat([v, mids, torch.nextafter(mids, torch.tensor(math.inf)), torch.nextafter(mids, torch.tensor(-math.inf))])
    ours = fmt.encode(v).to(torch.uint8)
    ref = _torch_fp8_codes(v, name)
    assert torch.equal(ours, ref), v[ours != ref][:5]


@pytest.mark.parametrize("name", list(FP8))
def test_fp8_decode_matches_torch_for_every_code(name):
    fmt = formats.get(name)
    codes = torch.arange(256, dtype=torch.int32)
    ours = fmt.decode(codes)
    ref = codes.to(torch.uint8).view(FP8[name][0]).float()
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(ours[ok], ref[ok]) and torch.equal(torch.signbit(ours[ok]), torch.signbit(ref[ok]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64),
       st.sampled_from(list(FP8)))
def test_fp8_encode_any_float32(xs, name):
    v = torch.tensor(xs, dtype=torch.float32)
    assert torch.equal(formats.get(name).encode(v).to(torch.uint8), _torch_fp8_codes(v, name))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=2, max_size=48),
       st.sampled_from(list(FP8)), st.floats(1e-3, 1e3))
def test_fp8_fake_quantize_is_the_torch_cast_of_x_over_s(xs, name, s):
    x = torch.tensor(xs, dtype=torch.float32)
    spec = lb.QuantSpec(format=name)
    s = torch.tensor(s, dtype=torch.float32)
    dtype, big = FP8[name]
    ref = (x / s).clamp(-big, big).to(dtype).float() * s
    assert torch.equal(ops.fake_quantize(x, spec, s, 0), ref)
    q = ops.quantize(x, spec, s, 0)
    assert q.dtype == torch.uint8 and torch.equal(q, _torch_fp8_codes(x / s, name))
    assert torch.equal(ops.dequantize(q, spec, s, 0), ref)


def test_nf4_levels_are_the_papers():
    assert formats.get("nf4").values().tolist() == torch.tensor(NF4_PAPER, dtype=torch.float32).double().tolist()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-3, 3, width=32), min_size=1, max_size=200))
def test_nf4_rounds_to_the_nearest_paper_level(xs):
    fmt = formats.get("nf4")
    v = torch.tensor(xs, dtype=torch.float32)
    table = torch.tensor(NF4_PAPER, dtype=torch.float64)
    dist = (v.double()[:, None] - table[None, :]).abs()
    got = fmt.round(v).double()
    best = dist.min(dim=1).values
    assert torch.equal((got[:, None] == table[None, :]).any(dim=1), torch.ones_like(got, dtype=torch.bool))
    assert torch.allclose((v.double() - got).abs(), best, rtol=0, atol=1e-12)
    codes = fmt.encode(v)
    assert torch.equal(table[codes.long()], got)        # code i is the i-th level, ascending


def test_nf4_block_absmax_by_hand():
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    spec = lb.QuantSpec(format="nf4")                   # PerGroup(64) by default
    assert spec.granularity == lb.PerGroup(64)
    scale, zp = ops.choose_qparams(x, spec)
    blocks = x.reshape(3, 2, 64)
    absmax = blocks.abs().amax(dim=2)
    assert torch.equal(scale, absmax) and not zp.any()
    table = torch.tensor(NF4_PAPER)
    v = blocks / absmax[..., None]
    ref = table[(v[..., None] - table).abs().argmin(dim=-1)] * absmax[..., None]
    assert torch.equal(ops.fake_quantize(x, spec, scale, zp), ref.reshape(3, 128))


# ------------------------------------------------------------------ an MX reference from the spec text
ELEMENTS = {  # element type: (exponent bits, mantissa bits, exponent bias) or "int8"; emax_elem (spec table 1)
    "mxfp4": ((2, 1, 1), 2), "mxfp8": ((4, 3, 7), 8), "mxint8": ("int8", 0),
}


def _round_half_even(a: float) -> float:
    return float(round(a))       # Python rounds half to even


def _ref_element(v: float, kind) -> float:
    if kind == "int8":          # two's complement, implicit scale 2^-6: k / 64, k in [-128, 127]
        return min(max(_round_half_even(v * 64), -128), 127) / 64
    e_bits, m_bits, bias = kind
    if kind == (4, 3, 7):
        max_normal = 448.0       # E4M3: S.1111.111 is NaN, so the largest normal is 1.75 * 2^8
    else:
        max_normal = 2.0 ** ((1 << e_bits) - 1 - bias) * (2 - 2.0 ** -m_bits)
    a = abs(v)
    if a == 0:
        return 0.0
    exp = max(math.floor(math.log2(a)), 1 - bias)   # subnormals share the smallest normal exponent
    quantum = 2.0 ** (exp - m_bits)
    r = min(_round_half_even(a / quantum) * quantum, max_normal)   # saturate
    return math.copysign(r, v)


def _ref_mx(x: list[float], name: str) -> list[float]:
    kind, emax = ELEMENTS[name]
    out = []
    for i in range(0, len(x), 32):
        block = x[i:i + 32]
        amax = max(abs(b) for b in block)
        if amax == 0:
            out += [0.0] * len(block)
            continue
        shared = math.floor(math.log2(amax)) - emax
        scale = 2.0 ** shared
        out += [_ref_element(b / scale, kind) * scale for b in block]
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=32, max_size=32 * 3).filter(lambda v: len(v) % 32 == 0),
       st.sampled_from(list(ELEMENTS)))
def test_mx_matches_the_spec_reference(xs, name):
    x = torch.tensor(xs, dtype=torch.float32)
    spec = lb.QuantSpec(format=name)
    assert spec.granularity == lb.PerGroup(32)
    scale, zp = ops.choose_qparams(x, spec)
    got = ops.fake_quantize(x, spec, scale, zp)
    ref = torch.tensor(_ref_mx([float(v) for v in x], name), dtype=torch.float32)
    assert torch.equal(got, ref)
    codes = ops.quantize(x, spec, scale, zp)
    assert torch.equal(ops.dequantize(codes, spec, scale, zp), ref)


def test_mxfp4_values_and_scales_by_hand():
    fmt = formats.get("mxfp4")
    assert fmt.values().tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    x = torch.zeros(32)
    x[0], x[1], x[2], x[3] = 7.0, 0.25, 0.75, 5.0      # amax 7: X = 2^(2 - 2) = 1
    spec = lb.QuantSpec(format="mxfp4")
    scale, zp = ops.choose_qparams(x, spec)
    assert scale.item() == 1.0
    y = ops.fake_quantize(x, spec, scale, zp)
    assert y[:4].tolist() == [6.0, 0.0, 1.0, 4.0]      # saturate; ties to even: 0.25 -> 0, 0.75 -> 1, 5 -> 4
    err = ops.quant_error(x, spec, scale, zp)
    assert err.clip_fraction == 1 / 32 and err.clip_mse == pytest.approx(1.0 / 32)


# ------------------------------------------------------------------ ONNX Runtime: FP8 QuantizeLinear/DequantizeLinear
@pytest.mark.parametrize("name", list(FP8))
@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_fp8_qdq_matches_onnxruntime(name, gran):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 3, 40)
    x[0, :4] = torch.tensor([1e9, -1e9, 0.0, -0.0])
    spec = lb.QuantSpec(format=name, granularity=lb.PerTensor() if gran == "tensor" else lb.PerChannel(0))
    scale, zp = ops.choose_qparams(x, spec)
    scale = scale * 0.5                                  # make some values saturate
    elem, _ = formats.get(name).onnx_types(spec)
    s = scale.numpy()
    attrs = {} if gran == "tensor" else {"axis": 0}
    inits = [helper.make_tensor("s", TensorProto.FLOAT, s.shape, s.ravel().tolist()),
             helper.make_tensor("zp", elem, s.shape, [0.0] * s.size),
             helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "one"], ["v"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("v", TensorProto.FLOAT, list(x.shape)),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    v, y = sess.run(None, {"x": x.numpy()})
    codes = ops.quantize(x, spec, scale, zp)
    assert torch.equal(spec.number_format.decode(codes), torch.from_numpy(v))
    assert torch.equal(ops.fake_quantize(x, spec, scale, zp), torch.from_numpy(y))
    assert torch.equal(ops.dequantize(codes, spec, scale, zp), torch.from_numpy(y))
