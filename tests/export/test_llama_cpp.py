"""llama.cpp itself (``llama-cpp-python``, the optional ``llama`` extra) runs what lb.export_gguf writes:
the same tokens as the Hugging Face tokenizer and the same outputs as torch within float tolerance.
Skipped when llama-cpp-python is not installed (it builds llama.cpp from source)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit as lb
from lowbit.transforms import gguf_grid

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'lowbit[llama]'")
pytest.importorskip("gguf")

from _tiny_models import bpe_tokenizer, minilm_tokenizer, tiny_bert, tiny_llama  # noqa: E402

TEXT = "The cat sat on the mat and looked at the dog."


def test_llama_logits(tmp_path):
    tok = bpe_tokenizer()
    model = tiny_llama(len(tok))
    q = lb.quantize(model, weights=lb.QuantSpec(bits=4, granularity=lb.PerGroup(32)), exclude=["lm_head"])
    gguf_grid(q, "q4_k")
    lb.freeze(q)
    for m, tol in ((model, 2e-3), (q, 5e-2)):   # llama.cpp's quantized dot products use 8-bit activations
        path = tmp_path / "m.gguf"
        lb.export_gguf(m, path, tokenizer=tok, float_type="f32")
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
        ids = llm.tokenize(TEXT.encode(), add_bos=False)
        assert ids == tok(TEXT)["input_ids"]
        llm.eval(ids)
        got = np.asarray(llm.scores[:len(ids)])
        llm.close()
        with torch.no_grad():
            ref = m(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(got - ref).max() <= tol * np.abs(ref).max()


def test_bert_embedding(tmp_path):
    tok = minilm_tokenizer()
    bert = tiny_bert(len(tok), hidden=64)
    path = tmp_path / "b.gguf"
    lb.export_gguf(bert, path, tokenizer=tok, float_type="f32")
    llm = llama_cpp.Llama(str(path), embedding=True, n_ctx=128, n_threads=1, verbose=False)
    assert llm.tokenize(TEXT.encode()) == tok(TEXT)["input_ids"]
    got = np.asarray(llm.embed(TEXT, normalize=False))
    llm.close()
    batch = tok([TEXT], return_tensors="pt")
    with torch.no_grad():
        ref = bert(**batch).last_hidden_state[0].mean(0).numpy()   # mean pooling, as bert.pooling_type says
    cos = float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.9999
