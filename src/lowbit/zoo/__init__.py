"""Built-in real data sets and models, offline (``lowbit.zoo``).

Stands apart from the quantization layers: it imports no other lowbit module, and only the
consumers (demo, benchmarks, analysis, CLI) import it.

- Data: ``load_dataset("digits" | "mnist1d") -> Dataset`` (fixed splits, standardised tensors),
  ``calibration_batches(dataset, ...)``.
- CNNs: ``get(name) -> (model, dataset)``, ``load_model(name, trained=True)``, ``build_model``,
  ``card(name)``; trained once (seconds) and cached under ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``.
- Training: ``train(model, dataset, TrainConfig(...), callback=...)``, ``evaluate``, ``predict``.
- MiniLM (extra ``transformers``): ``load_minilm()``, ``sentences()``, ``encode``,
  ``tokenized_batches``, ``compare_embeddings``, ``prose_sentences()`` (out-of-domain prose), ``evaluate_minilm``, ``spearman``.
"""
from .catalog import MODELS, NAMES, ModelCard, build_model, cache_path, card, dataset_of, get, load_model, recipe
from .cache import cache_dir
from .corpus import CORPUS_SOURCE, all_sentences, corpus_fingerprint, sentences
from .datasets import DATASETS, Dataset, calibration_batches, iterate_batches, load_dataset
from .minilm import (MiniLMEvaluation, encode, evaluate_minilm, load_minilm, time_encode, tokenized_batches,
                     transformer_of)
from .prose import PROSE_SOURCE, prose_sentences
from .models import DigitsCNN, MNIST1DCNN, ResidualBlock1d
from .similarity import EmbeddingAgreement, compare_embeddings, pairwise_cosine, rankdata, spearman
from .training import EpochStats, TrainConfig, evaluate, predict, train

__all__ = [
    "MODELS", "NAMES", "DATASETS", "ModelCard", "Dataset", "TrainConfig", "EpochStats",
    "build_model", "load_model", "get", "card", "recipe", "cache_path", "cache_dir", "dataset_of",
    "load_dataset", "calibration_batches", "iterate_batches",
    "DigitsCNN", "MNIST1DCNN", "ResidualBlock1d",
    "train", "evaluate", "predict",
    "CORPUS_SOURCE", "sentences", "all_sentences", "corpus_fingerprint", "PROSE_SOURCE", "prose_sentences",
    "load_minilm", "transformer_of", "encode", "tokenized_batches", "time_encode", "evaluate_minilm",
    "MiniLMEvaluation", "EmbeddingAgreement", "compare_embeddings", "pairwise_cosine", "rankdata", "spearman",
]
