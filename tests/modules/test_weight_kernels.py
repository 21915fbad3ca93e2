"""Frozen weight-only linear layers: the int4/int8 kernels against the exact dequantize path,
aten's own packing as the oracle of the tiled layout, and no float copy kept."""
import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.modules import QuantLinear
from lowbit.ops import weight_only
from lowbit.quantize import quant_layers

SPECS = {
    "int4 sym g32": lb.QuantSpec(bits=4, granularity=lb.PerGroup(32)),
    "int4 asym g64": lb.QuantSpec(bits=4, symmetric=False, signed=False, granularity=lb.PerGroup(64)),
    "int3 sym g128": lb.QuantSpec(bits=3, granularity=lb.PerGroup(128)),
    "int8 per channel": lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)),
    "int8 asym per channel": lb.QuantSpec(bits=8, symmetric=False, granularity=lb.PerChannel(0)),
}
EXPECTED = {"int4 sym g32": "int4", "int4 asym g64": "int4", "int3 sym g128": "int4", "int8 per channel": "int8",
            "int8 asym per channel": "int8"}


def _frozen(spec, kernel, out=128, inp=256, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inp, out), nn.ReLU(), nn.Linear(out, 64, bias=False))
    q = lb.quantize(model, weights=spec)
    return lb.freeze(q, kernel=kernel)


def test_tiled_layout_is_atens_packing():
    u = torch.randint(0, 16, (192, 96), dtype=torch.int32)
    assert torch.equal(weight_only.int4_tiles(u), torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1))
    assert torch.equal(weight_only.int4_untile(weight_only.int4_tiles(u), 96), u.to(torch.uint8))


@pytest.mark.parametrize("signed", [True, False])
def test_stored_layout_round_trips_through_the_tiles(signed):
    spec = lb.QuantSpec(bits=4, signed=signed, symmetric=signed)
    q = torch.randint(spec.qmin, spec.qmax + 1, (128, 64))
    stored = lb.QTensor.from_int(q, spec, 1.0, 0 if signed else 8).data
    tiles = weight_only.onnx_to_int4_tiles(stored, 128, 64, signed)
    assert torch.equal(weight_only.int4_untile(tiles, 64).to(torch.int32) - (8 if signed else 0), q)
    assert torch.equal(weight_only.int4_tiles_to_onnx(tiles, 128, 64, signed), stored)


@pytest.mark.parametrize("name", list(SPECS))
def test_kernels_agree_with_the_exact_path_within_bfloat16_rounding(name):
    exact = _frozen(SPECS[name], "dequantize")
    fast = _frozen(SPECS[name], "auto")
    assert [l.runtime for _, l in quant_layers(fast)] == [EXPECTED[name]] * 2
    assert [l.runtime for _, l in quant_layers(exact)] == ["dequantize"] * 2
    x = torch.randn(5, 256)
    with torch.no_grad():
        ref, got = exact(x), fast(x)
        # the bound of lowbit.ops.weight_only: bfloat16 activations (and int4 pair) rounding
        first = exact[0]
        h_ref = first(x)
        h_got = fast[0](x)
        bound = 2.0 ** -7 * (x.abs() @ first.quantized_weight().abs().t()) + 1e-5
    assert bool(((h_got - h_ref).abs() <= bound).all())
    assert torch.allclose(got, ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
    # many rows: compute-bound, so the exact path (same weights; the GEMM may sum in another order)
    big = torch.randn(64, 256)
    with torch.no_grad():
        assert torch.allclose(fast(big), exact(big), rtol=1e-5, atol=1e-6)


def test_kernels_run_bfloat16_models_and_only_small_inputs():
    spec = SPECS["int4 sym g32"]
    q = _frozen(spec, "auto")
    exact = _frozen(spec, "dequantize")
    x = torch.randn(QuantLinear.kernel_max_rows + 1, 256)
    with torch.no_grad():
        assert torch.allclose(q(x), exact(x), rtol=1e-5, atol=1e-6)   # more rows: the exact path
        qb, eb = q.to(torch.bfloat16), exact.to(torch.bfloat16)
        assert qb[0].runtime == "int4"
        y = qb(x.bfloat16())
        assert y.dtype == torch.bfloat16
        assert torch.allclose(y.float(), eb(x.bfloat16()).float(), rtol=0.05, atol=0.05)


def test_fallback_when_a_kernel_does_not_work(monkeypatch, caplog):
    monkeypatch.setattr(weight_only, "kernel_works", lambda name: False)
    q = _frozen(SPECS["int4 sym g32"], "auto")
    assert [l.runtime for _, l in quant_layers(q)] == ["dequantize", "dequantize"]
    exact = _frozen(SPECS["int4 sym g32"], "dequantize")
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.allclose(q(x), exact(x), rtol=1e-5, atol=1e-6)


def test_kernel_check_logs_once_when_the_kernel_is_broken(monkeypatch, caplog):
    weight_only.kernel_works.cache_clear()
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda x, w, s: torch.zeros(x.shape[0], w.shape[0]))
    try:
        with caplog.at_level("WARNING", logger="lowbit"):
            assert not weight_only.kernel_works("int8")
            assert not weight_only.kernel_works("int8")
        assert sum("int8 weight-only kernel is not usable" in r.message for r in caplog.records) == 1
    finally:
        weight_only.kernel_works.cache_clear()


def test_frozen_layer_keeps_no_float_copy_of_its_weight():
    q = _frozen(SPECS["int4 sym g32"], "auto", out=256, inp=512)
    layer = q[0]
    with torch.no_grad():
        q(torch.randn(2, 512))
        q(torch.randn(40, 512))           # the dequantize path too
    big = 256 * 512
    held = list(layer.state_dict().values()) + list(layer.buffers()) + [
        v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    assert not [t for t in held if t.is_floating_point() and t.numel() >= big // 8]
    # codes 0.5 B + per group of 32: scale, int32 zero point, bf16 kernel pair (0.375 B): < 1/4 of float32
    assert sum(t.numel() * t.element_size() for t in layer.buffers()) < 0.25 * big * 4


def test_state_dict_save_load_and_to_keep_the_stored_codes():
    spec = SPECS["int4 asym g64"]
    q = _frozen(spec, "auto")
    layer = q[0]
    assert layer.runtime == "int4"
    stored = layer.state_dict()["weight_codes"]
    exact = _frozen(spec, "dequantize")
    assert torch.equal(stored, exact[0].weight_codes)                # checkpoints see the ONNX layout
    assert torch.equal(layer.qweight.int_repr(), exact[0].qweight.int_repr())
    assert torch.equal(layer.quantized_weight(), exact[0].quantized_weight())
    q2 = _frozen(spec, "auto", seed=1)
    q2.load_state_dict(q.state_dict())
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(q2(x), q(x))
        q.to(torch.float64).to(torch.float32)                           # release and re-lay on .to()
        assert q[0].runtime == "int4" and torch.equal(q(x), q2(x))


def test_freeze_rejects_an_unknown_kernel():
    with pytest.raises(ValueError, match="kernel must be one of"):
        _frozen(SPECS["int8 per channel"], "int")


def test_tied_embedding_never_reads_the_int4_tiles_of_its_linear_partner():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    spec = lb.QuantSpec(bits=4, granularity=lb.PerGroup(32))
    ids = torch.randint(0, 256, (1, 20))       # more rows than the kernel takes: the exact path
    outs = {}
    for kernel in ("auto", "dequantize"):
        q = lb.freeze(lb.quantize(model, weights=spec, embeddings=spec), kernel=kernel)
        with torch.no_grad():
            outs[kernel] = q(ids).logits
    assert q.model.embed_tokens.weight_codes is q.lm_head.weight_codes   # shared where the layouts agree
    assert torch.allclose(outs["auto"], outs["dequantize"], rtol=1e-5, atol=1e-5)
