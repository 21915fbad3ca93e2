"""Quantized transformers: sentence-embedding models (MiniLM), their evaluation and execution backends.

* :mod:`~lowbit.transformer.sentence`: quantize the transformer inside a sentence-transformers
  model with a recipe (:func:`quantize_sentence_model`), swap it back in (:func:`with_transformer`),
  storage sizes (:func:`model_bytes`, :func:`weight_bytes`).
* :mod:`~lowbit.transformer.backends`: what runs the frozen model (lowbit's torch modules, the
  integer reference, ONNX Runtime on the exported graph), and :func:`fastest` among them.
* :mod:`~lowbit.transformer.minilm`: ``lowbit quantize --model minilm``: quantize, evaluate and time
  all-MiniLM-L6-v2 (:func:`quantize_minilm`).

The transformer-specific recipes (``w8a8-smooth``, ``w8a8-dynamic``, ``w4g128-...``) and the
``"transformer"`` family mapping live in :mod:`lowbit.recipes`; SmoothQuant in
:func:`lowbit.transforms.smooth_quant`.
"""
from .backends import BACKENDS, Backend, available, build, candidates, fastest, register_backend
from .minilm import FAMILY, quantize_minilm, read_sentences, split_sentences, timed_encode
from .sentence import WeightBytes, calibration_batches, model_bytes, quantize_sentence_model, weight_bytes, with_transformer

__all__ = [
    "quantize_sentence_model", "calibration_batches", "with_transformer", "model_bytes", "weight_bytes", "WeightBytes",
    "Backend", "BACKENDS", "register_backend", "available", "candidates", "build", "fastest",
    "quantize_minilm", "read_sentences", "split_sentences", "timed_encode", "FAMILY",
]
