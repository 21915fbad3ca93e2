"""Running a model on one batch, and reading its output as one tensor.

A *batch* is what ``lb.analyze`` and the calibration APIs take (DESIGN.md): a tensor (``model(x)``),
a tuple or list of positional arguments (``model(*args)``), or a dict of keyword arguments
(``model(**kwargs)``). A model's *output* may be a tensor, a tuple/list (its first tensor is used),
a dict or a ``ModelOutput``-like object (``logits``, then ``sentence_embedding``, then
``last_hidden_state``, then its first tensor value).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["run_batch", "output_tensor", "as_batch_list", "batch_size"]

_OUTPUT_KEYS = ("logits", "sentence_embedding", "last_hidden_state")


def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model(batch)``, ``model(*batch)`` or ``model(**batch)`` by the batch's type."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):  # dicts inside are copied: some models add keys to them
        return model(*[dict(v) if isinstance(v, dict) else v for v in batch])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(f"a batch must be a tensor, a tuple of positional args or a dict of keyword args; "
                    f"got {type(batch).__name__}")


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
    """``batches`` as a list of batches (a single tensor is refused: pass ``[x]`` for one batch)."""
    if isinstance(batches, torch.Tensor):
        raise TypeError(f"{arg} must be an iterable of batches; for a single batch pass [x] (a list holding the tensor)")
    if isinstance(batches, (str, bytes, dict)) or not isinstance(batches, Iterable):
        raise TypeError(f"{arg} must be an iterable of model inputs (tensors, tuples or dicts); "
                        f"got {type(batches).__name__}")
    out = list(batches)
    if not out:
        raise ValueError(f"{arg} is empty: pass at least one batch of model inputs")
    return out


def batch_size(batch: Any) -> int:
    """Number of samples in a batch (the first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    return 1
