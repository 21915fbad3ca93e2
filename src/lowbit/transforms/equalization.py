"""Cross-layer equalization (CLE) for ReLU networks.

Nagel, van Baalen, Blankevoort, Welling 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction" (ICCV), Sec. 4.1. For two layers joined by a positively homogeneous map
``f`` (ReLU, LeakyReLU, identity, max/avg pooling, flatten: ``f(x / s) = f(x) / s`` per channel for
``s > 0``)::

    y = W2 f(W1 x + b1) + b2 = (W2 S) f(S^-1 W1 x + S^-1 b1) + b2,    S = diag(s)

so scaling output channel ``i`` of the first layer by ``1/s_i`` and input channel ``i`` of the
second by ``s_i`` leaves the float function unchanged. With ``r1_i`` the range (max |w|) of row
``i`` of ``W1`` and ``r2_i`` that of the weights reading input channel ``i`` of ``W2``, the choice

    s_i = sqrt(r1_i * r2_i) / r2_i          (so both ranges become sqrt(r1_i * r2_i))

maximizes the summed per-channel precision ``sum_i (r1_i / R1)(r2_i / R2)`` of the two
per-tensor grids. Chains of more than two layers are equalized pair by pair, repeatedly, until
the factors stop changing; at the fixed point ``r1_i / max(r1) == r2_i / max(r2)`` for every pair.
A bounded ReLU ``min(max(x, 0), c)`` is homogeneous only if its bound moves too: it becomes
per-channel ``c / s_i`` (:class:`~lowbit.transforms.bound.BoundedReLU`), exactly.

It helps per-tensor weight grids most (per-channel grids already adapt to each row, though the
second layer's input channels still benefit). Grouped convolutions are handled (depthwise
included). BatchNorm is folded first (an affine map does not commute with the scaling).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import QuantLayer, layer_class
from .bound import BoundedReLU
from .. import batches as _batches
from .fold_bn import fold_batchnorm, module_calls
from .verify import check_preserved

__all__ = ["equalize", "find_equalization_pairs", "EqualizationPair"]

log = logging.getLogger(__name__)

_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.ReLU6, BoundedReLU)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_BOUNDED = (nn.ReLU6, BoundedReLU)   # their bound moves with the channel scale (so: used once only)
_FUNCS = {torch.relu: "relu", F.relu: "relu", F.leaky_relu: "relu", torch.flatten: "flatten"}


@dataclass
class EqualizationPair:
    """Two layers joined by channel-wise positively homogeneous ops (``between``, module names)."""

    first: str
    second: str
    between: list[str] = field(default_factory=list)   # names of bounded ReLU modules (limits move)
    flatten: bool = False                              # a flatten joins a conv to a linear layer


def _is_layer(m: object) -> bool:
    """A layer of a registered type that is exactly its library class (a subclass may compute anything)."""
    cls = layer_class(m) if isinstance(m, nn.Module) else None
    return cls is not None and type(m) is cls.base_type(m)


def _gemm(m: nn.Module) -> torch.Tensor:
    """``m``'s weight as ``[out, in...]`` (see :meth:`lowbit.modules.QuantLayer.float_gemm_weight`)."""
    return layer_class(m).float_gemm_weight(m)


def _set_gemm(m: nn.Module, w: torch.Tensor) -> None:
    """Write the GEMM view ``w`` back into ``m.weight`` (in place, its dtype)."""
    m.weight.data.copy_(layer_class(m).float_weight_from_gemm(m, w).to(m.weight.dtype))


def _linear_like(m: nn.Module) -> bool:
    return layer_class(m).channel_dim == -1


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BoundedReLU) or super().is_leaf_module(m, qualname)


def _link(node, modules: dict, conv: bool) -> tuple[str, object] | None:
    """Classify one op between the two layers: ("elementwise"|"pool"|"flatten", module name or None)."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _ELEMENTWISE):
            return "elementwise", node.target if isinstance(m, _BOUNDED) else None
        if isinstance(m, _POOLS):
            return ("pool", None) if conv else None
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return "flatten", None
        return None
    if node.op == "call_function" and node.target in _FUNCS:
        if _FUNCS[node.target] == "relu":
            return "elementwise", None
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return ("flatten", None) if start == 1 and end == -1 else None
    if node.op == "call_method" and node.target in ("relu", "flatten"):
        if node.target == "relu":
            return "elementwise", None
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return ("flatten", None) if start == 1 and end == -1 else None
    return None


def _valid(first: nn.Module, second: nn.Module, flatten: bool) -> bool:
    c = _gemm(first).shape[0]
    inputs = layer_class(second).float_in_channels(second)
    if _linear_like(first):
        return not flatten and _linear_like(second) and inputs == c
    if _linear_like(second):
        return flatten and inputs % c == 0
    return not flatten and inputs == c


def _pairs_by_tracing(model: nn.Module) -> list[EqualizationPair]:
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = module_calls(graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_layer(modules[node.target]) or calls[node.target] != 1:
            continue
        second = modules[node.target]
        conv = not _linear_like(second)
        cur, between, flatten = node.args[0] if node.args else None, [], False
        while isinstance(cur, torch.fx.Node) and len(cur.users) == 1:
            if cur.op == "call_module" and _is_layer(modules[cur.target]):
                if calls[cur.target] == 1 and _valid(modules[cur.target], second, flatten):
                    pairs.append(EqualizationPair(cur.target, node.target, between[::-1], flatten))
                break
            kind = _link(cur, modules, conv or flatten)
            if kind is None or (kind[1] is not None and calls[kind[1]] != 1):
                break
            if kind[0] == "flatten":
                if flatten:
                    break
                flatten = True
            if kind[1] is not None:
                between.append(kind[1])
            cur = cur.args[0] if cur.args else None
    return pairs


def _pairs_in_sequentials(model: nn.Module) -> list[EqualizationPair]:
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{name}." if name else ""
        children = list(seq.named_children())
        for i, (a, first) in enumerate(children):
            if not _is_layer(first) or uses[id(first)] != 1:
                continue
            between, flatten, conv = [], False, not _linear_like(first)
            for b, m in children[i + 1:]:
                if _is_layer(m):
                    if uses[id(m)] == 1 and _valid(first, m, flatten):
                        pairs.append(EqualizationPair(prefix + a, prefix + b, between, flatten))
                    break
                if isinstance(m, _BOUNDED):
                    if uses[id(m)] != 1:
                        break
                    between.append(prefix + b)
                elif isinstance(m, _ELEMENTWISE):
                    pass
                elif isinstance(m, _POOLS) and conv and not flatten:
                    pass
                elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1 and not flatten:
                    flatten = True
                else:
                    break
    return pairs


def find_equalization_pairs(model: nn.Module) -> list[EqualizationPair]:
    """Consecutive layer pairs that cross-layer equalization can rescale (see module docstring).

    Found by tracing with ``torch.fx`` (each layer called once, every intermediate value used once);
    where tracing fails, as neighbours inside ``nn.Sequential`` containers.
    """
    try:
        return _pairs_by_tracing(model)
    except Exception as e:  # noqa: BLE001 - fx cannot trace data-dependent control flow; fall back
        log.debug("torch.fx could not trace %s (%s); equalizing inside nn.Sequential only", type(model).__name__, e)
        return _pairs_in_sequentials(model)


def _second_view(second: nn.Module, channels: int) -> torch.Tensor:
    """``|W2|`` (GEMM view) as ``[groups, out/groups, in/groups, rest]`` (a flattened linear: groups 1, rest =
    features per channel)."""
    w = _gemm(second).detach().double().abs()
    g = getattr(second, "groups", 1)
    return w.reshape(g, w.shape[0] // g, channels // g, -1)


def _scale_second(second: nn.Module, s: torch.Tensor) -> None:
    w = _gemm(second).detach().double()
    out, channels, g = w.shape[0], s.numel(), getattr(second, "groups", 1)
    rest = w[0].numel() * g // channels
    factor = s.reshape(g, 1, channels // g, 1).expand(g, out // g, channels // g, rest).reshape(w.shape)
    _set_gemm(second, w * factor)


def _limit_shape(first: nn.Module, channels: int) -> tuple[int, ...]:
    return (channels,) if _linear_like(first) else (channels,) + (1,) * (_gemm(first).dim() - 2)


@torch.no_grad()
def _equalize_pair(model: nn.Module, pair: EqualizationPair) -> float:
    """Apply one round of equalization to ``pair``; returns ``max |log s|`` (0 at the fixed point)."""
    first, second = model.get_submodule(pair.first), model.get_submodule(pair.second)
    w1 = _gemm(first).detach().double()                  # output channels are the rows of the GEMM view
    channels = w1.shape[0]
    r1 = w1.abs().reshape(channels, -1).amax(1)
    r2 = _second_view(second, channels).amax(dim=(1, 3)).reshape(-1)
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 * r2) / r2, torch.ones_like(r1))
    _set_gemm(first, w1 / s.reshape((-1,) + (1,) * (w1.dim() - 1)))
    if first.bias is not None:
        first.bias.data.copy_((first.bias.data.double() / s).to(first.bias.dtype))
    _scale_second(second, s)
    for name in pair.between:
        act = model.get_submodule(name)
        if isinstance(act, nn.ReLU6):
            act = BoundedReLU(6.0)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, act)
        act.scale_channels(1.0 / s, _limit_shape(first, channels))
    return float(s.log().abs().max())


@torch.inference_mode(False)   # what it builds stays ordinary tensors when called inside inference_mode
def equalize(model: nn.Module, iterations: int = 100, tol: float = 1e-6, *, reference=None) -> nn.Module:
    """A cross-layer-equalized copy of the float ``model`` (which is not modified).

    BatchNorm is folded into the layer before it, then every pair found by
    :func:`find_equalization_pairs` is rescaled (see the module docstring) for up to ``iterations``
    sweeps, stopping early once no factor changes by more than ``tol`` (relative). Apply before
    ``lb.quantize``. The equalized pairs are listed in ``copy.lowbit_equalized``.

    ``reference`` (one model input, as a calibration batch; recipes pass their first batch): the
    copy must compute ``model``'s function on it (relative change <= 1e-4, see
    :mod:`lowbit.transforms.verify`), else ``ValueError`` names the equalized pairs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("model is already quantized; apply equalize to the float model, then lb.quantize the result")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    out = copy.deepcopy(model)
    fold_batchnorm(out)
    pairs = find_equalization_pairs(out)
    if not pairs:
        log.warning("lowbit: equalize found no layer pair joined by ReLU/identity/pooling in %s", type(model).__name__)
    for sweep in range(iterations):
        change = max((_equalize_pair(out, p) for p in pairs), default=0.0)
        if change <= tol:
            break
    log.info("lowbit: equalized %d layer pairs in %d sweeps", len(pairs), sweep + 1 if pairs else 0)
    out.lowbit_equalized = pairs
    if reference is not None:
        device = _batches.model_device(out)
        check_preserved(model, out, reference, lambda m, b: _batches.call(m, b, device), "equalize",
                        [f"{p.first}->{p.second}" for p in pairs])
    return out
