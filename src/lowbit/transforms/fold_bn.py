"""Fold BatchNorm into the convolution (or linear layer) that feeds it.

In eval mode BatchNorm is the affine map ``y = gamma * (x - mu) / sqrt(var + eps) + beta``; applied
after ``x = W * u + b`` it folds into the layer::

    W' = W * gamma / sigma        (per output channel: per row of the layer's GEMM view)
    b' = (b - mu) * gamma / sigma + beta,      sigma = sqrt(var + eps)

so the quantized model has one weight tensor per layer and no float BatchNorm (Jacob et al. 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference").
Pairs are found by tracing the model with ``torch.fx`` (a layer whose only user is a BatchNorm),
or, where tracing fails, as neighbours inside ``nn.Sequential`` containers (WARNING naming the
BatchNorm layers left unfolded). Each fold checks itself: on a random probe input the folded layer
must give what layer + BatchNorm (eval mode) gave, else ``ValueError`` names the pair. Folding a
model in training mode is logged at WARNING (running statistics are frozen into the weights).
"""
from __future__ import annotations

import collections
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import layer_class
from ..modules.tree import set_module
from .verify import tolerance

__all__ = ["fold_batchnorm", "find_conv_bn_pairs"]

log = logging.getLogger(__name__)

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    """A layer type that folds BN (:attr:`lowbit.modules.QuantLayer.folds_bn`, the layer's class decides)."""
    cls = layer_class(layer)
    if cls is None or not cls.folds_bn or not isinstance(bn, _NORMS):
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False
    return bn.num_features == cls.float_gemm_weight(layer).shape[0]


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
        pairs = _pairs_in_sequentials(model)
        folded = {bn for _, bn in pairs}
        left = [n for n, m in model.named_modules() if isinstance(m, _NORMS) and n not in folded]
        if left:
            log.warning("lowbit: torch.fx could not trace %s (%s: %s); BatchNorm is folded only inside nn.Sequential, "
                        "so %s stay unfolded (float BatchNorm after a quantized layer)", type(model).__name__,
                        type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "", left[:5])
        return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable BatchNorm into its layer, **in place**; the BatchNorm becomes ``nn.Identity``.

    Returns the folded ``(layer, batchnorm)`` names. Only valid for inference (BN's running stats).
    """
    pairs = find_conv_bn_pairs(model)
    if pairs and model.training:
        log.warning("lowbit: folding %d BatchNorm layers with their running statistics while the model is in "
                    "training mode: the result has no BatchNorm (training it, e.g. QAT, updates no statistics); "
                    "call model.eval() first, or pass fold_bn=False to keep BatchNorm", len(pairs))
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        cls = layer_class(layer)
        probe = cls.probe_input(layer, 2)
        expected = F.batch_norm(layer(probe).double(), bn.running_mean.double(), bn.running_var.double(),
                                None if bn.weight is None else bn.weight.double(),
                                None if bn.bias is None else bn.bias.double(), False, 0.0, bn.eps)
        inv_sigma = torch.rsqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_sigma)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_sigma)
        factor = gamma * inv_sigma
        w, gemm = layer.weight, cls.float_gemm_weight(layer)       # GEMM view: output channels are its rows
        shape = [-1] + [1] * (gemm.dim() - 1)
        new_w = cls.float_weight_from_gemm(layer, gemm.double() * factor.reshape(shape)).to(w.dtype).contiguous()
        b = layer.bias.double() if layer.bias is not None else torch.zeros_like(inv_sigma)
        new_b = ((b - bn.running_mean.double()) * factor + beta).to(w.dtype)
        layer.weight = nn.Parameter(new_w, requires_grad=w.requires_grad)
        layer.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)
        got = layer(probe).double()
        err = (got - expected).abs().max().item()
        if not err <= tolerance(w.dtype) * max(expected.abs().max().item(), 1e-12):
            raise ValueError(f"folding BatchNorm {bn_name!r} into {layer_name!r} ({type(layer).__name__}) changed the "
                             f"output by {err:.3g} on a probe input: the layer does not compute its base class's "
                             "function; pass fold_bn=False")
        set_module(model, bn_name, nn.Identity())
    return pairs

