"""Fold BatchNorm into the convolution (or linear layer) that feeds it.

In eval mode BatchNorm is the affine map ``y = gamma * (x - mu) / sqrt(var + eps) + beta``; applied
after ``x = W * u + b`` it folds into the layer::

    W' = W * gamma / sigma        (per output channel)
    b' = (b - mu) * gamma / sigma + beta,      sigma = sqrt(var + eps)

so the quantized model has one weight tensor per layer and no float BatchNorm (Jacob et al. 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference").
Pairs are found by tracing the model with ``torch.fx`` (a layer whose only user is a BatchNorm),
or, where tracing fails, as neighbours inside ``nn.Sequential`` containers.
"""
from __future__ import annotations

import collections
import logging

import torch
from torch import nn

from ..modules.tree import set_module

__all__ = ["fold_batchnorm", "find_conv_bn_pairs"]

log = logging.getLogger(__name__)

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(layer, _LAYERS) or not isinstance(bn, _NORMS):
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False
    return bn.num_features == layer.weight.shape[0]


def module_calls(graph: torch.fx.Graph) -> collections.Counter:
    """How many times the traced ``graph`` calls each submodule (by name): a module called twice
    (shared) cannot take a per-call change."""
    return collections.Counter(node.target for node in graph.nodes if node.op == "call_module")


def _pairs_by_tracing(model: nn.Module) -> list[tuple[str, str]]:
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = module_calls(graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[node.target] == 1 and calls[src.target] == 1 and _foldable(modules[src.target], modules[node.target]):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_in_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            children = list(mod.named_children())
            for (a, la), (b, lb_) in zip(children, children[1:]):
                if _foldable(la, lb_):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names of ``(layer, batchnorm)`` pairs whose BatchNorm can be folded into the layer."""
    try:
        return _pairs_by_tracing(model)
    except Exception as e:  # noqa: BLE001 - tracing fails on data-dependent control flow; fall back
        log.debug("torch.fx could not trace %s (%s); folding BatchNorm inside nn.Sequential only",
                  type(model).__name__, e)
        return _pairs_in_sequentials(model)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable BatchNorm into its layer, **in place**; the BatchNorm becomes ``nn.Identity``.

    Returns the folded ``(layer, batchnorm)`` names. Only valid for inference (BN's running stats).
    """
    pairs = find_conv_bn_pairs(model)
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        inv_sigma = torch.rsqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_sigma)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_sigma)
        factor = gamma * inv_sigma
        w = layer.weight
        shape = [-1] + [1] * (w.dim() - 1)
        new_w = (w.double() * factor.reshape(shape)).to(w.dtype)
        b = layer.bias.double() if layer.bias is not None else torch.zeros_like(inv_sigma)
        new_b = ((b - bn.running_mean.double()) * factor + beta).to(w.dtype)
        layer.weight = nn.Parameter(new_w, requires_grad=w.requires_grad)
        layer.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)
        set_module(model, bn_name, nn.Identity())
    return pairs
