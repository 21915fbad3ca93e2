"""Running a model on one batch, and reading its output as one tensor.

A *batch* is what ``lb.analyze`` and the calibration APIs take (see :mod:`lowbit.batches`): a
tensor (``model(x)``), a tuple or list of positional arguments (``model(*args)``), or a dict of
keyword arguments (``model(**kwargs)``). A model's *output* may be a tensor, a tuple/list (its
first tensor is used), a dict or a ``ModelOutput``-like object (``logits``, then
``sentence_embedding``, then ``last_hidden_state``, then its first tensor value).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import batches as _batches

__all__ = ["run_batch", "output_tensor", "as_batch_list", "batch_size"]

_OUTPUT_KEYS = ("logits", "sentence_embedding", "last_hidden_state")


def run_batch(model: nn.Module, batch: Any) -> Any:
    """:func:`lowbit.batches.call` on the model's device; dicts inside a tuple batch are copied first
    (a SentenceTransformer adds keys to the features dict it is given, and the batch is the user's)."""
    if isinstance(batch, (tuple, list)):
        batch = tuple(dict(v) if isinstance(v, dict) else v for v in batch)
    return _batches.call(model, batch, _batches.model_device(model))


def output_tensor(out: Any) -> torch.Tensor:
    """The one tensor a model output stands for (see the module docstring)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        for key in _OUTPUT_KEYS:
            if key in out and isinstance(out[key], torch.Tensor):
                return out[key]
        for value in out.values():
            if isinstance(value, torch.Tensor):
                return value
    for key in _OUTPUT_KEYS:
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)):
        for value in out:
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"cannot read a tensor from a model output of type {type(out).__name__}; "
                    "return a tensor (or a dict with 'logits' / 'sentence_embedding') from forward")


def as_batch_list(batches: Any, arg: str = "batches") -> list:
    """``batches`` as a checked list (:func:`lowbit.batches.as_batches`)."""
    return _batches.as_batches(batches, arg)


def batch_size(batch: Any) -> int:
    """Number of samples in a batch (the first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    return 1
