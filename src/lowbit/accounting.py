"""What ``lb.quantize`` did to every layer: quantized, or float and why (``q.lowbit_coverage``).

Every module of the quantized model that holds parameters of its own is listed once, either as
quantized (with its quantized class) or as float with the reason: not selected by
``include``/``exclude``, a type lowbit does not quantize, a subclass whose forward computes
something else, inside ``nn.MultiheadAttention``, an embedding table without ``embeddings=``.
A *Linear-like* layer (``nn.Linear``/``nn.Conv*d`` or a subclass, transformers' ``Conv1D``, a class
named ``*Linear`` with a 2-D weight) that stays float without the user asking for it is logged at
WARNING: it is the case where a user would otherwise believe the model quantized.

Tied parameters (one tensor in several modules, e.g. ``lm_head.weight is embed_tokens.weight``) are
settled here, before any algorithm changes a weight: if every owner is quantized on the same grid
the tie is kept (``lb.freeze`` gives them one set of codes, stored once by ``lb.save``); otherwise
each quantized owner gets its own copy of the weight, so GPTQ or freezing cannot change the float
table, and the report says so (``untied``). A module reachable by several paths is replaced on each
(``aliases``).
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

from torch import nn

from .modules import is_linear_like, layer_class
from .modules.quant_weight import QuantWeight
from .modules.sharing import tied_parameters, untie

__all__ = ["Coverage", "coverage", "account"]

log = logging.getLogger(__name__)


@dataclass
class Coverage:
    """Per module of the quantized model (see the module docstring)."""

    quantized: dict[str, str] = field(default_factory=dict)     # name -> quantized class
    float: dict[str, str] = field(default_factory=dict)         # name -> why it stayed float
    linear_like_float: list[str] = field(default_factory=list)  # the float ones a user would expect quantized
    tied: list[list[str]] = field(default_factory=list)         # parameter names that are one tensor (kept)
    untied: dict[str, str] = field(default_factory=dict)        # quantized layer -> the tie it left, and why
    aliases: dict[str, str] = field(default_factory=dict)       # second path -> the module's first name

    def as_dict(self) -> dict:
        return {"quantized": dict(self.quantized), "float": dict(self.float),
                "linear_like_float": list(self.linear_like_float), "tied": [list(g) for g in self.tied],
                "untied": dict(self.untied), "aliases": dict(self.aliases)}

    def summary(self) -> str:
        return (f"{len(self.quantized)} quantized, {len(self.float)} float "
                f"({len(self.linear_like_float)} of them Linear-like)")


def coverage(q: nn.Module) -> Coverage:
    """The :class:`Coverage` of a model returned by ``lb.quantize``."""
    if not isinstance(q, nn.Module):
        raise TypeError(f"q must be a torch.nn.Module, got {type(q).__name__}")
    cov = getattr(q, "lowbit_coverage", None)
    if cov is None:
        raise ValueError("q carries no coverage report: it was not returned by lb.quantize (or lb.load)")
    return cov


def _settle_ties(q: nn.Module, cov: Coverage) -> None:
    modules = dict(q.named_modules())
    for group in tied_parameters(q):
        owners = [(n.rpartition(".")[0], n.rpartition(".")[2]) for n in group]
        quant = [(mn, a) for mn, a in owners if isinstance(modules[mn], QuantWeight) and a == "weight"]
        if not quant:
            continue
        floats = [f"{mn}.{a}" if mn else a for mn, a in owners if (mn, a) not in quant]
        mods = [modules[mn] for mn, _ in quant]
        same = len({(m.weight_quant.spec, m.weight_quant.observer, m._codes_shape()) for m in mods}) == 1
        if not floats and same:
            cov.tied.append(list(group))
            continue
        keep = [] if floats else quant[:1]
        for mn, _ in quant:
            if (mn, "weight") in keep:
                continue
            untie(modules[mn])
            why = (f"its weight was tied to {', '.join(floats)} which stays float" if floats else
                   f"its weight was tied to {keep[0][0]}.weight, quantized on another grid")
            cov.untied[mn] = why + "; it now has its own copy (the float tensor is unchanged)"
            log.warning("lowbit: untied %s: %s", mn, cov.untied[mn])


def _reason(name: str, module: nn.Module, skipped: dict, include, exclude) -> str:
    if name in skipped:
        return skipped[name]
    if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
        return "excluded by exclude"
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return "not selected by include"
    return f"{type(module).__name__} is not a layer lowbit quantizes"


def account(q: nn.Module, skipped: dict[str, str], include=None, exclude=None) -> Coverage:
    """Settle ties, then list every parameter-holding module of ``q``; logs Linear-like float layers."""
    cov = Coverage()
    _settle_ties(q, cov)
    first: dict[int, str] = {}
    for name, m in q.named_modules(remove_duplicate=False):
        if id(m) in first:
            if not any(name.startswith(a + ".") for a in cov.aliases):   # not the inside of an alias
                cov.aliases[name] = first[id(m)]
            continue
        first[id(m)] = name
    inside_quant: set[str] = set()
    for name, m in q.named_modules():
        if isinstance(m, QuantWeight):
            cov.quantized[name] = type(m).__name__
            inside_quant.update(f"{name}.{c}" for c, _ in m.named_modules() if c)
            continue
        if not name or name in inside_quant or not any(True for _ in m.parameters(recurse=False)):
            continue
        why = _reason(name, m, skipped, include, exclude)
        cov.float[name] = why
        user_choice = why in ("excluded by exclude", "not selected by include")
        if (is_linear_like(m) or layer_class(m) is not None or isinstance(m, nn.Conv3d)) and not user_choice:
            cov.linear_like_float.append(name)
    for name, why in cov.float.items():
        if name not in cov.linear_like_float:
            log.info("lowbit: %s stays float: %s", name, why)
    if cov.linear_like_float:
        shown = "; ".join(f"{n}: {cov.float[n]}" for n in cov.linear_like_float[:8])
        more = f" (and {len(cov.linear_like_float) - 8} more)" if len(cov.linear_like_float) > 8 else ""
        log.warning("lowbit: %d Linear-like layers stay float: %s%s", len(cov.linear_like_float), shown, more)
    return cov

