"""Calibration batches: what a "batch" is and how a model is called on one.

Data-aware algorithms (``lb.transforms.bias_correction``, ``smooth_quant``, ``lb.gptq``, the
analysis) take ``batches``: an iterable of **model inputs**, one item per batch, where an item is

* a tensor ``x``                    -> ``model(x)``
* a tuple or list of arguments      -> ``model(*args)``
* a dict of keyword arguments       -> ``model(**kwargs)`` (e.g. a Hugging Face tokenizer's output)

Labels are not part of a batch: pass ``(x for x, _ in loader)``, not the loader itself, when the
loader yields ``(inputs, labels)`` pairs.

``as_batches`` checks and materializes them once (algorithms that walk the model layer by layer
run over the same batches several times, so a generator would be exhausted after one pass);
``call`` runs a model on one batch, moving its tensors to the model's device.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch
from torch import nn

__all__ = ["Batch", "as_batches", "call", "to_device", "model_device"]

Batch = Union[torch.Tensor, tuple, list, Mapping]


def _check_batch(batch: Any, i: int, arg: str) -> None:
    if isinstance(batch, torch.Tensor):
        return
    if isinstance(batch, Mapping):
        bad = [k for k in batch if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{arg}[{i}]: a dict batch holds keyword arguments, so its keys must be strings, got {bad[0]!r}")
        return
    if isinstance(batch, (tuple, list)):
        return
    raise TypeError(f"{arg}[{i}] must be a tensor, a tuple of positional arguments or a dict of keyword "
                    f"arguments, got {type(batch).__name__}")


def as_batches(batches: Iterable[Batch], arg: str = "batches") -> list[Batch]:
    """The batches as a list, each checked; ``ValueError`` if there is none.

    A single tensor is not taken as "an iterable of rows": pass ``[x]`` for one batch.
    """
    if isinstance(batches, torch.Tensor):
        raise TypeError(f"{arg} must be an iterable of batches; for a single batch pass [x] (a list holding the tensor)")
    if isinstance(batches, (Mapping, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"{arg} must be an iterable of model inputs (a list of tensors, tuples or dicts), "
                        f"got {type(batches).__name__}")
    out = list(batches)
    if not out:
        raise ValueError(f"{arg} is empty: pass at least one batch of calibration inputs "
                         "(a list of tensors, argument tuples or keyword dicts)")
    for i, b in enumerate(out):
        _check_batch(b, i, arg)
    return out


def to_device(batch: Batch, device: torch.device | str | None) -> Batch:
    """``batch`` with every tensor in it (one level deep) moved to ``device`` (a no-op for None)."""
    if device is None:
        return batch

    def move(v):
        return v.to(device) if isinstance(v, torch.Tensor) else v

    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move(v) for k, v in batch.items()}
    return tuple(move(v) for v in batch)


def model_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter or buffer (None for a model without tensors)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def call(model: nn.Module, batch: Batch, device: torch.device | str | None = None) -> Any:
    """Run ``model`` on one batch (see the module docstring), tensors moved to ``device`` first."""
    batch = to_device(batch, device)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    _check_batch(batch, 0, "batch")
    return None  # unreachable: _check_batch raised
