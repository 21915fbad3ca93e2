"""``to_integer(q)``: a copy of a frozen model whose quantized layers compute in integers.

Every frozen :class:`lowbit.modules.QuantLayer` with quantized inputs becomes an
:class:`~lowbit.integer.layer.IntegerLayer`; other modules are kept as they are. Where a layer's
output reaches exactly one other integer layer through operations that commute with a monotone
grid (ReLU, ReLU6/Hardtanh, max pooling, flatten/reshape, dropout at inference, identity), the
layer requantizes its int32 accumulator straight onto that layer's input grid with a fixed-point
multiplier (:func:`lowbit.ops.integer_math.requantize`); the next layer then reads those codes
back exactly. The links are found by tracing the model with ``torch.fx`` (quantized layers as
leaves); a model that does not trace keeps float outputs between layers (still integer GEMMs).

Modules keep float tensors at their interfaces: a requantized output is handed on as
``(q - z_out) * s_out``, which the next layer's input quantizer maps back to ``q`` exactly.
"""
from __future__ import annotations

import builtins
import copy
import logging
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..modules import QuantLayer
from ..modules.tree import set_module
from ..ops.integer_math import REQUANT_ROUNDING
from ..quantize import frozen_quant_layers, quant_layers
from ..spec import PerTensor
from .layer import IntegerLayer, from_quant_layer, unsupported_reason

__all__ = ["to_integer", "IntegerInfo", "link_output_grids"]

log = logging.getLogger(__name__)

_GRID_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d,
                 nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d)
_GRID_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.hardtanh, torch.flatten, F.max_pool1d, F.max_pool2d,
                   torch.reshape, F.dropout}
_GRID_METHODS = {"relu", "flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze"}
_META_METHODS = {"size", "dim"}


@dataclass
class IntegerInfo:
    """What :func:`to_integer` did (``model.lowbit_integer``)."""

    integer: list[str] = field(default_factory=list)
    float_layers: dict[str, str] = field(default_factory=dict)   # quantized layer -> why it runs in float
    requantized: dict[str, str] = field(default_factory=dict)    # layer -> layer whose input grid it writes
    traced: bool = True


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantLayer, IntegerLayer)) or super().is_leaf_module(m, qualname)


def _data_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    users = []
    for u in node.users:
        if u.op == "call_method" and u.target in _META_METHODS:
            continue
        if u.op == "call_function" and u.target is builtins.getattr:
            continue
        users.append(u)
    return users


def _grid_preserving(node: torch.fx.Node, src: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if not node.args or node.args[0] is not src:
        return False
    if any(isinstance(a, torch.fx.Node) and a is not src and a.op not in ("call_method", "call_function")
           for a in node.args[1:]):
        return False
    if node.op == "call_module":
        return isinstance(modules[node.target], _GRID_MODULES)
    if node.op == "call_function":
        return node.target in _GRID_FUNCTIONS
    if node.op == "call_method":
        return node.target in _GRID_METHODS
    return False


def link_output_grids(model: nn.Module) -> dict[str, str]:
    """Point each :class:`IntegerLayer` of ``model`` at the next layer's input grid where the
    path between them preserves the grid (see the module docstring); returns ``{layer: next}``."""
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    links = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), IntegerLayer):
            continue
        cur = node
        while True:
            users = _data_users(cur)
            if len(users) != 1:
                break
            nxt = users[0]
            if nxt.op == "call_module" and isinstance(modules.get(nxt.target), IntegerLayer):
                target = modules[nxt.target]
                if nxt.args and nxt.args[0] is cur and not target.dynamic and isinstance(
                        target.input_spec.granularity, PerTensor):
                    if modules[node.target].set_output_grid(target.input_spec, target.input_scale,
                                                            target.input_zero_point):
                        links[node.target] = nxt.target
                break
            if not _grid_preserving(nxt, cur, modules):
                break
            cur = nxt
    return links


def to_integer(q: nn.Module, *, requantize: bool = True, rounding: str = "half_even",
               strict: bool = False) -> nn.Module:
    """A copy of the frozen quantized model ``q`` whose Linear/Conv layers run on integers.

    Args:
        requantize: requantize layer outputs onto the next layer's grid where the path allows it
            (fixed-point multiplier); otherwise every integer layer outputs float.
        rounding: tie breaking of requantization: ``"half_even"`` (as ONNX and the fake-quantized
            model), ``"half_away"`` or ``"gemmlowp"`` (TFLite reference, double rounding).
        strict: raise ``ValueError`` if a quantized layer cannot run on integers (instead of keeping
            it on its float path and listing it in ``model.lowbit_integer.float_layers``).

    The copy is in eval mode; ``q`` is untouched. Integer layers accept the same inputs as before.
    """
    frozen_quant_layers(q, "to_integer")   # checks
    if rounding not in REQUANT_ROUNDING:
        raise ValueError(f"rounding must be one of {REQUANT_ROUNDING}, got {rounding!r}")
    model = copy.deepcopy(q).eval()
    info = IntegerInfo()
    for name, layer in quant_layers(model):
        why = unsupported_reason(layer)
        if why is not None:
            if strict:
                raise ValueError(f"layer {name!r} cannot run on integers: {why} (strict=False keeps it in float)")
            info.float_layers[name] = why
            continue
        set_module(model, name, from_quant_layer(layer, rounding))
        info.integer.append(name)
    if not info.integer:
        raise ValueError(f"no layer can run on integers: {info.float_layers}")
    if requantize:
        try:
            info.requantized = link_output_grids(model)
        except Exception as e:  # noqa: BLE001 - fx fails on data-dependent control flow; float outputs still work
            info.traced = False
            log.info("lowbit: torch.fx could not trace %s (%s); integer layers output float", type(q).__name__, e)
    for name, why in info.float_layers.items():
        log.info("lowbit: %s stays on the float path: %s", name, why)
    model.lowbit_integer = info
    return model
