"""lb.export_compressed_tensors / lb.load_compressed_tensors against the real client: transformers
with the compressed-tensors package loads the directory on CPU and computes what lowbit's frozen
model computes; reading it back gives the same codes."""
from __future__ import annotations

import json

import pytest
import torch

import lowbit as lb
from lowbit.export.compressed_tensors import export_compressed_tensors, load_compressed_tensors, pack_int32, \
    unpack_int32

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")

from _tiny_models import minilm_tokenizer, tiny_bert, tiny_llama  # noqa: E402

SPECS = {
    "w8": lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)),
    "w4g128": lb.QuantSpec(bits=4, granularity=lb.PerGroup(128)),
    "w4g128-asym": lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerGroup(128)),
}


def _load_hf(cls, path, asym):
    # compressed-tensors 0.20.1 + transformers 5.25: the compressed (run-in-place) skeleton of an
    # asymmetric pack-quantized layer has the unpacked zero-point shape, so loading fails; the
    # decompress-on-load path works for every scheme
    from transformers import CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if asym else {}
    return cls.from_pretrained(str(path), local_files_only=True, **kw).eval()


def _same_codes(a, b):
    la, lb_ = dict(lb.quant_layers(a)), dict(lb.quant_layers(b))
    assert set(la) == set(lb_) and la
    for n in la:
        x, y = la[n].qweight, lb_[n].qweight
        assert torch.equal(x.int_repr(), y.int_repr()), n
        assert torch.equal(x.scale.float().reshape(-1), y.scale.float().reshape(-1)), n
        assert torch.equal(x.zero_point.reshape(-1), y.zero_point.reshape(-1)), n


@pytest.mark.parametrize("name", list(SPECS))
def test_llama_transformers_loads_and_matches(name, tmp_path):
    model = tiny_llama(300, hidden=128, inter=256)
    q = lb.freeze(lb.quantize(model, weights=SPECS[name], exclude=["lm_head"]))
    info = export_compressed_tensors(q, tmp_path)
    assert len(info.quantized) == 14 and not info.fallback
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    ct.QuantizationConfig.model_validate(cfg)                 # the package's own schema accepts it
    assert cfg["ignore"] == ["lm_head"]
    hf = _load_hf(transformers.AutoModelForCausalLM, tmp_path, not SPECS[name].symmetric)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = q(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()
    back = load_compressed_tensors(tmp_path)
    _same_codes(q, back)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ours)


@pytest.mark.parametrize("name", ["w8", "w4g128-asym"])
def test_bert_transformers_loads_and_matches(name, tmp_path):
    tok = minilm_tokenizer()
    bert = tiny_bert(len(tok), hidden=128)
    q = lb.freeze(lb.quantize(bert, weights=SPECS[name]))
    export_compressed_tensors(q, tmp_path)
    hf = _load_hf(transformers.AutoModel, tmp_path, not SPECS[name].symmetric)
    batch = tok(["a small test sentence", "another one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours, theirs = q(**batch).last_hidden_state, hf(**batch).last_hidden_state
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()
    _same_codes(q, load_compressed_tensors(tmp_path))


def test_packing_matches_the_package():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(1)
    for bits in (4, 8):
        q = torch.randint(-(1 << bits - 1), 1 << bits - 1, (6, 64), generator=g, dtype=torch.int32)
        for dim in (0, 1):
            ours = pack_int32(q, bits, dim)
            assert torch.equal(ours, pack_to_int32(q.to(torch.int8), bits, packed_dim=dim))
            n = q.shape[dim]
            assert torch.equal(unpack_int32(ours, bits, n, dim), q)
            assert torch.equal(unpack_from_int32(ours, bits, q.shape, packed_dim=dim).to(torch.int32), q)


def test_layers_the_format_cannot_hold_stay_float(tmp_path):
    model = tiny_llama(300, hidden=128, inter=256)
    q = lb.freeze(lb.quantize(model, weights=lb.QuantSpec(bits=3, granularity=lb.PerChannel(0)),
                              include=["*.mlp.*", "model.embed_tokens"], embeddings=lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))),
                  kernel="dequantize")   # the exact path: lowbit's decode kernels round activations to bfloat16
    info = export_compressed_tensors(q, tmp_path)
    assert "model.embed_tokens" in info.fallback and "model.layers.0.mlp.up_proj" in info.fallback
    assert "3-bit" in info.fallback["model.layers.0.mlp.up_proj"] and not info.quantized
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, q(ids).logits, atol=1e-5)


def test_load_rejects_what_is_not_compressed_tensors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_compressed_tensors(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no compressed-tensors quantization_config"):
        load_compressed_tensors(tmp_path)
