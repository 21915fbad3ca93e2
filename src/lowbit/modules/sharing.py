"""Tied and shared parameters: one tensor reached from several modules.

A language model's output projection is often *tied* to its token embedding (``lm_head.weight is
embed_tokens.weight``): one ``nn.Parameter`` registered in two modules. A deep copy keeps the tie,
so anything that rescales or overwrites one of them in place (SmoothQuant/AWQ factors, GPTQ's
rounding, freezing) changes the other. lowbit finds the ties first (:func:`tied_parameters`) and
then either keeps one quantized tensor for the pair (same grid on both sides,
:func:`share_frozen_codes`) or gives the layer its own copy and says so (:func:`untie`).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["tied_parameters", "tied_partners", "untie", "share_frozen_codes"]


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of dotted parameter names that are the same tensor (one group per tied tensor, >= 2
    names each; a module reachable by two paths does not count as a tie)."""
    owners: dict[int, list[str]] = {}
    for mod_name, m in model.named_modules():   # one name per module instance
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{pname}" if mod_name else pname)
    return [g for g in owners.values() if len(g) > 1]


def tied_partners(model: nn.Module, module: nn.Module, attr: str = "weight") -> list[str]:
    """Names of the other parameters of ``model`` that are ``module.<attr>`` itself."""
    p = module._parameters.get(attr)
    if p is None:
        return []
    out = []
    for mod_name, m in model.named_modules():
        if m is module:
            continue
        for pname, other in m.named_parameters(recurse=False):
            if other is p:
                out.append(f"{mod_name}.{pname}" if mod_name else pname)
    return out


def untie(module: nn.Module, attr: str = "weight") -> None:
    """Give ``module`` its own copy of parameter ``attr`` (the other owners keep the original)."""
    p = module._parameters[attr]
    setattr(module, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))


@torch.no_grad()
def share_frozen_codes(groups: list[list[nn.Module]]) -> None:
    """After freezing: the modules of each group (their float weights were one tensor, quantized on
    one grid) hold the first module's codes, scales and zero points, one tensor each (so
    ``lb.save`` stores them once)."""
    for group in groups:
        first = group[0]
        for other in group[1:]:
            # the same run-time layout too: a QuantLinear on the int4 kernel holds its codes re-tiled,
            # which an embedding table (or an exact-path layer) would misread
            same = (other.weight_quant.spec == first.weight_quant.spec
                    and tuple(other.weight_codes.shape) == tuple(first.weight_codes.shape)
                    and other._codes_shape() == first._codes_shape()
                    and getattr(other, "runtime", "dequantize") == getattr(first, "runtime", "dequantize"))
            if not same:
                continue
            for b in ("weight_codes", "weight_scale", "weight_zero_point"):
                setattr(other, b, getattr(first, b))


def tied_quant_groups(modules: list[nn.Module]) -> list[list[nn.Module]]:
    """Groups of (un-frozen) quantized modules whose master ``weight`` is one tensor; quantized
    layers (which GPTQ may have rounded) first."""
    groups: dict[int, list[nn.Module]] = {}
    for m in modules:
        w = m._parameters.get("weight")
        if w is not None:
            groups.setdefault(id(w), []).append(m)
    return [sorted(g, key=lambda m: not hasattr(m, "input_quant")) for g in groups.values() if len(g) > 1]
