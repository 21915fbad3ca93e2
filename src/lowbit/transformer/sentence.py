"""Quantize a sentence-embedding model (a sentence-transformers ``SentenceTransformer``) with a recipe.

The quantizer works on the Hugging Face transformer inside (``BertModel`` for MiniLM,
:func:`lowbit.zoo.transformer_of`): every ``nn.Linear`` is quantized; embeddings, LayerNorms,
attention softmax and pooling stay float (listed in ``lowbit_info.skipped``). Calibration batches
are the tokenizer's outputs (dicts of ``input_ids``/``attention_mask``/``token_type_ids``) for
sentences of equal token length (:func:`calibration_batches`): a padded batch would calibrate on
the hidden states of its padding tokens, which the model computes but masks out of every result
(with the built-in sentences in batches of 32, 57% of the tokens were padding), and the
data-aware weight methods (GPTQ, AWQ) would fit their output error. The quantized transformer is put back into a copy of the
``SentenceTransformer``, so ``model.encode`` and the zoo's evaluation run it like the float model::

    st_q = quantize_sentence_model(st, recipes.get("w8a8", family="transformer"), calibration_sentences)
    zoo.evaluate_minilm(st_q, sentences, reference=float_embeddings)
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import zoo
from ..modules import QuantLayer
from ..quantize import quant_layers
from ..recipes import Recipe

__all__ = ["with_transformer", "quantize_sentence_model", "calibration_batches", "model_bytes",
           "weight_bytes", "WeightBytes"]


def _check_st(model) -> None:
    zoo.transformer_of(model)   # TypeError unless a SentenceTransformer holding a transformer


def _slot(model: nn.Module) -> tuple[nn.Module, str]:
    """``(owner, attribute)`` of the transformer inside ``model[0]``."""
    first = model[0]
    for attr in ("model", "auto_model"):
        if isinstance(first._modules.get(attr), nn.Module):
            return first, attr
    raise TypeError(f"{type(first).__name__} (model[0]) holds no transformer module (.model / .auto_model)")


def with_transformer(model: nn.Module, inner: nn.Module) -> nn.Module:
    """A copy of ``model`` whose transformer is ``inner`` (``inner`` itself, not a copy; the
    tokenizer and pooling are copied, the old transformer's weights are not)."""
    _check_st(model)
    if not isinstance(inner, nn.Module):
        raise TypeError(f"inner must be a torch.nn.Module, got {type(inner).__name__}")
    old = zoo.transformer_of(model)
    out = copy.deepcopy(model, memo={id(old): inner})
    owner, attr = _slot(out)
    if owner._modules[attr] is not inner:   # pragma: no cover - deepcopy honours the memo
        owner._modules[attr] = inner
    return out


def calibration_batches(model: nn.Module, sentences: list[str], batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches without padding: the sentences grouped by token length, at most
    ``batch_size`` per batch (shortest first; sentences keep their order within a length)."""
    texts = list(sentences)
    if not texts:
        raise ValueError("sentences is empty; pass at least one calibration sentence")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    max_length = getattr(model, "max_seq_length", None) or 256
    lengths = [len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    by_length: dict[int, list[str]] = {}
    for n, t in zip(lengths, texts):
        by_length.setdefault(n, []).append(t)
    out = []
    for n in sorted(by_length):
        out += zoo.tokenized_batches(model, by_length[n], batch_size, max_length=max_length)
    return out


def quantize_sentence_model(model: nn.Module, recipe: Recipe, sentences: list[str] | None = None, *,
                            batch_size: int = 32, freeze: bool = True) -> nn.Module:
    """A copy of ``model`` whose transformer is quantized by ``recipe``, calibrated on ``sentences``.

    ``sentences`` may be None for a recipe that needs no calibration (weight-only, dynamic).
    The returned model carries ``lowbit_seconds`` (wall and CPU seconds of the quantization).
    """
    _check_st(model)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a lowbit.recipes.Recipe, got {type(recipe).__name__}")
    inner = zoo.transformer_of(model)
    t0, c0 = time.perf_counter(), time.process_time()
    batches = calibration_batches(model, sentences, batch_size) if sentences is not None else None
    q = recipe.apply(inner, batches, freeze=freeze)
    out = with_transformer(model, q)
    out.lowbit_seconds = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    return out


def model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model stores (state dict; shared tensors counted once; packed
    integer codes at their packed size)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else (id(t),)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class WeightBytes:
    """Storage of the quantized layers' weights: as integers (codes + scales + zero points) and as float32."""

    quantized: int
    float32: int

    @property
    def ratio(self) -> float:
        return self.float32 / self.quantized if self.quantized else float("nan")


def weight_bytes(model: nn.Module) -> WeightBytes:
    """:class:`WeightBytes` over the frozen quantized layers of ``model``."""
    layers = [layer for _, layer in quant_layers(model) if isinstance(layer, QuantLayer)]
    if not layers:
        raise ValueError("model has no quantized layer")
    q = sum(layer.qweight.nbytes for layer in layers)
    f = sum(4 * int(torch.Size(layer._weight_shape).numel()) for layer in layers)
    return WeightBytes(quantized=q, float32=f)
