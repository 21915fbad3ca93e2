"""Editing a module tree by dotted name (``"features.0"``, ``"encoder.layer.3.attention"``)."""
from __future__ import annotations

from torch import nn


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` of ``model`` by ``new``, in place (``name`` as in ``named_modules``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def module_paths(model: nn.Module, module: nn.Module) -> list[str]:
    """Every dotted name under which ``module`` is reachable in ``model`` (a module registered twice,
    e.g. the same block twice in an ``nn.Sequential``, has several)."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Replace ``old`` by ``new`` on every path that reaches it (in place); returns those paths."""
    paths = module_paths(model, old)
    for p in paths:
        if p:
            set_module(model, p, new)
    return paths
