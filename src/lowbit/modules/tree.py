"""Editing a module tree by dotted name (``"features.0"``, ``"encoder.layer.3.attention"``)."""
from __future__ import annotations

from torch import nn


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` of ``model`` by ``new``, in place (``name`` as in ``named_modules``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
