"""Architecture coverage, offline: small random-init Hugging Face models (GPT-2, Llama, Qwen2, Gemma2,
Mistral, Phi-3, OPT, BERT; 2 layers, hidden 64) built from their configs, with tied and untied
embeddings, through the recipes users run.

Oracles: the float model's own layer list (every layer computing ``x @ W^T`` -- ``nn.Linear`` or
transformers' ``Conv1D`` -- must be quantized, or listed as float with its reason), the float
model's embedding table (bit-identical before and after), the float model's logits (cosine), and
the quantized model itself (save/load gives bit-identical logits).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import lowbit as lb
from _archs import ARCHS, DECODERS, batches, build

pytest.importorskip("transformers")

# half the architectures tied, half untied, so both kinds run on each recipe without doubling the time
TIED = {a: i % 2 == 0 for i, a in enumerate(ARCHS)}


def _linear_like(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _check_accounted(m, q):
    cov = lb.coverage(q)
    names = _linear_like(m)
    assert names, "the architecture has no linear layer?"
    for n in names:   # a smoothed layer is quantized as <name>.linear (SmoothQuant/AWQ's explicit factor)
        assert n in cov.quantized or f"{n}.linear" in cov.quantized or n in cov.float, \
            f"{n} neither quantized nor reported float"
    assert cov.linear_like_float == [], {n: cov.float[n] for n in cov.linear_like_float}
    return cov


@pytest.mark.parametrize("arch", ARCHS)
def test_w8a8_transformer_recipe(arch):
    tied = TIED[arch]
    m = build(arch, tied)
    table = m.get_input_embeddings().weight.detach().clone()
    b = batches()
    q = lb.recipes.get("w8a8", family="transformer").apply(m, b)   # SmoothQuant, then W8A8
    cov = _check_accounted(m, q)
    assert torch.equal(m.get_input_embeddings().weight, table)       # the float model is untouched
    if tied:
        assert cov.tied or cov.untied, "a tied pair neither kept nor untied"
    assert _cos(_logits(m, b[0]), _logits(q, b[0])) > 0.995


@pytest.mark.parametrize("arch", ARCHS)
def test_w8_and_w4g32_save_load_generate(arch, tmp_path):
    tied = not TIED[arch]
    m = build(arch, tied)
    b = batches()
    ref = _logits(m, b[0])
    for name, min_cos in (("w8", 0.999), ("w4g32", 0.9)):
        q = lb.recipes.get(name).apply(m, b)
        _check_accounted(m, q)
        out = _logits(q, b[0])
        assert _cos(ref, out) > min_cos, name
    path = lb.save(q, tmp_path / "q.safetensors")
    q2 = lb.load(path, build(arch, tied))
    assert torch.equal(_logits(q2, b[0]), out)
    if arch in DECODERS:
        ids = b[0]["input_ids"][:1, :4]
        g1 = q.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        g2 = q2.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert g1.shape == (1, 7) and torch.equal(g1, g2)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "llama"])
def test_w4g128_awq_gptq(arch):
    m = build(arch, tied=True)
    table = m.get_input_embeddings().weight.detach().clone()
    b = batches()
    rec = lb.recipes.get("w4g128", family="transformer")
    assert rec.name == "w4g128-awq-gptq"
    awq_opts = dict(rec.transforms[0][1], grid=4)                  # the recipe, with a coarser AWQ grid
    rec = dataclasses.replace(rec, transforms=(("awq", awq_opts),) + rec.transforms[1:])
    q = rec.apply(m, b)
    _check_accounted(m, q)
    assert torch.equal(m.get_input_embeddings().weight, table)
    assert _cos(_logits(m, b[0]), _logits(q, b[0])) > 0.98


def test_gemma_norm_smoothing_preserves_the_function():
    """Gemma's RMSNorm computes x * (1 + w): folding a SmoothQuant factor must keep the logits."""
    m = build("gemma2", tied=False)
    b = batches()
    s = lb.transforms.smooth_quant(m, b, alpha=0.5)
    assert any(v.how.startswith("folded") for v in s.lowbit_smoothing.layers.values())
    ref, out = _logits(m, b[0]), _logits(s, b[0])
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_analyze(arch):
    m = build(arch, tied=True)
    b = batches()
    q = lb.recipes.get("w8a8").apply(m, b)
    rep = lb.analyze(m, q, b, bound=False, mdl=False)
    assert rep is not None
