"""lb.export_gguf: files the ``gguf`` package's reader reads back bit-exactly, with the metadata
llama.cpp needs; bad input fails before anything is written."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import lowbit as lb
from lowbit.export.gguf import export_gguf
from lowbit.transforms import gguf_grid

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
from gguf import quants  # noqa: E402

from _tiny_models import bpe_tokenizer, minilm_tokenizer, tiny_bert, tiny_llama  # noqa: E402

G32 = lb.PerGroup(32)


@pytest.fixture(scope="module")
def llama():
    tok = bpe_tokenizer()
    model = tiny_llama(len(tok))
    # mixed on purpose: MLP Q4_K, attention output Q4_0, q/k/v Q8_0, lm_head float
    q = lb.quantize(model, weights=lb.QuantSpec(bits=4, granularity=G32), include=["*.mlp.*", "*.o_proj"])
    gguf_grid(q, "q4_k")
    for layer in q.model.layers:
        gguf_grid(layer.self_attn.o_proj, "q4_0")
    q8 = lb.quantize(model, weights=lb.QuantSpec(bits=8, granularity=G32), include=["*.q_proj", "*.k_proj", "*.v_proj"])
    gguf_grid(q8, "q8_0")
    for i, layer in enumerate(q.model.layers):
        for n in ("q_proj", "k_proj", "v_proj"):
            setattr(layer.self_attn, n, getattr(q8.model.layers[i].self_attn, n))
    return tok, model, lb.freeze(q)


def _perm(rows, heads):
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def test_llama_round_trip_bit_exact(llama, tmp_path):
    tok, model, q = llama
    path = tmp_path / "tiny.gguf"
    info = export_gguf(q, path, tokenizer=tok)
    assert {"Q4_K", "Q4_0", "Q8_0"} <= set(info.counts()) and not info.fallback
    assert info.float_weights == ["token_embd.weight", "output.weight"]
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    modules = dict(q.named_modules())
    cfg = model.config
    checked = 0
    for i in range(cfg.num_hidden_layers):
        for hf, gname, heads in (("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                                 ("self_attn.v_proj", "attn_v", None), ("self_attn.o_proj", "attn_output", None),
                                 ("mlp.gate_proj", "ffn_gate", None), ("mlp.up_proj", "ffn_up", None),
                                 ("mlp.down_proj", "ffn_down", None)):
            layer = modules[f"model.layers.{i}.{hf}"]
            t = tensors[f"blk.{i}.{gname}.weight"]
            assert t.tensor_type.name == info.tensors[t.name]
            want = layer.qweight.dequantize().numpy()
            if heads:
                want = want[_perm(want.shape[0], heads)]     # llama.cpp's rotary row order
            got = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
            assert np.array_equal(got, want), t.name
            checked += 1
    assert checked == 14
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type.name == "F32"
    assert np.array_equal(np.asarray(norm.data), model.model.layers[0].input_layernorm.weight.detach().numpy())
    f = reader.fields
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.attention.head_count_kv"].contents() == 2
    assert f["llama.rope.dimension_count"].contents() == 64
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(f["tokenizer.ggml.tokens"].contents()) == len(tok)
    assert len(f["tokenizer.ggml.merges"].contents()) > 0


def test_bert_metadata_and_vocab(tmp_path):
    tok = minilm_tokenizer()
    bert = tiny_bert(len(tok))
    q = lb.quantize(bert, weights=lb.QuantSpec(bits=8, granularity=G32))
    gguf_grid(q, "q8_0")
    path = tmp_path / "bert.gguf"
    info = export_gguf(lb.freeze(q), path, tokenizer=tok)
    assert info.counts()["Q8_0"] == 12 and not info.fallback
    f = gguf.GGUFReader(str(path)).fields
    assert f["general.architecture"].contents() == "bert"
    assert f["bert.pooling_type"].contents() == int(gguf.PoolingType.MEAN)
    assert f["bert.attention.causal"].contents() is False
    tokens = f["tokenizer.ggml.tokens"].contents()
    vocab = tok.get_vocab()
    assert tokens[vocab["[CLS]"]] == "[CLS]" and tokens[vocab["hello"]] == "\u2581hello"
    assert tokens[vocab["##s"]] == "s"
    assert f["tokenizer.ggml.bos_token_id"].contents() == tok.cls_token_id
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[tok.unk_token_id] == int(gguf.TokenType.UNKNOWN) and types[tok.cls_token_id] == int(gguf.TokenType.CONTROL)


def test_layers_no_block_type_holds_stay_float_and_are_listed(llama, tmp_path):
    tok, model, _ = llama
    q = lb.freeze(lb.quantize(model, weights=lb.QuantSpec(bits=4, granularity=lb.PerGroup(128)), include=["*.mlp.*"]))
    info = export_gguf(q, tmp_path / "g128.gguf", tokenizer=tok)
    assert set(info.fallback) == {f"blk.{i}.ffn_{n}.weight" for i in range(2) for n in ("gate", "up", "down")}
    assert all("PerGroup(32)" in why for why in info.fallback.values())
    assert all(info.tensors[n] == "F16" for n in info.fallback)
    assert "ffn_gate" in info.summary()


def test_activation_quantization_is_listed_as_dropped(llama, tmp_path):
    tok, model, _ = llama
    q = lb.quantize(model, weights=lb.QuantSpec(bits=8, granularity=G32),
                    activations=lb.QuantSpec(bits=8, dynamic=True, granularity=lb.PerToken()), include=["*.q_proj"])
    info = export_gguf(lb.freeze(q), tmp_path / "a8.gguf", tokenizer=tok)
    assert any("activation quantization of model.layers.0.self_attn.q_proj" in d for d in info.dropped)


def test_unknown_architecture_fails_before_writing(tmp_path):
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=16))
    path = tmp_path / "gpt2.gguf"
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        export_gguf(model, path, tokenizer=bpe_tokenizer())
    assert os.listdir(tmp_path) == []


def test_tokenizer_that_cannot_be_converted(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    with pytest.raises(ValueError, match="tokenizer: cannot convert .*WordLevel"):
        export_gguf(tiny_bert(2, hidden=32, layers=1), tmp_path / "x.gguf", tokenizer=tok)
    with pytest.raises(ValueError, match="pass tokenizer="):
        export_gguf(tiny_bert(2, hidden=32, layers=1), tmp_path / "x.gguf")
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_the_old_file(llama, tmp_path, monkeypatch):
    tok, _, q = llama
    path = tmp_path / "model.gguf"
    path.write_bytes(b"old")

    def boom(self, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(q, path, tokenizer=tok)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.gguf"]
