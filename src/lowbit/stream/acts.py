"""Activation streams between units: in memory, or spilled to disk one batch per file.

A stream holds one tensor per calibration batch (the hidden states a unit passes to the next).
In memory that is ``batches x tokens x hidden`` floats per stream, twice while a unit turns its
inputs into its outputs; when that exceeds the memory budget the runner *spills*: each output
goes to its own file as soon as it is computed and is read back when a batch is needed, so only
one batch per stream is in memory at a time. :class:`Acts` is a re-iterable sequence of batches
either way, which is what ``lb.gptq`` (one pass per layer group) needs.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["Acts", "LayerBatches"]


class Acts:
    """A re-iterable list of tensors, each held in memory or in a file."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.items[i]
        return torch.load(x, weights_only=True) if isinstance(x, Path) else x

    def __iter__(self):
        for i in range(len(self.items)):
            yield self[i]


class LayerBatches:
    """Decoder layer ``index``'s calibration batches: ``{"hidden_states": h, **recorded kwargs}``."""

    def __init__(self, hidden: Acts, kwargs: list[list[dict]], index: int) -> None:
        self.hidden, self.kwargs, self.index = hidden, kwargs, index

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, i: int) -> dict:
        return {"hidden_states": self.hidden[i], **self.kwargs[i][self.index]}

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]
