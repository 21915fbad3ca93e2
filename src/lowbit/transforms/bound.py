"""Bounded activations: ReLU becomes ``clip(x, 0, limit)`` (ReLU6 when ``limit = 6``).

An unbounded ReLU lets a few large activations set the range of the next layer's input quantizer,
so most values land on a handful of codes. Clipping at a fixed ``limit`` makes the range known
before calibration (``[0, limit]``; an unsigned 8-bit grid has step ``limit / 255``) and robust to
outliers in the calibration data (Sandler et al. 2018, "MobileNetV2", use ReLU6 for low-precision
robustness; Krishnamoorthi 2018, "Quantizing deep convolutional networks for efficient inference",
Sec. 3.1).

The trade-off: where the float model's activations exceed ``limit`` the function changes. Measure
it with :func:`activation_clipping` on calibration data before choosing ``limit``; if a noticeable
fraction is clipped, fine-tune the bounded model (or raise the limit). Usually applied to the
float model before fine-tuning or before ``lb.quantize``.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import batches as _batches

__all__ = ["BoundedReLU", "bound_activations", "activation_clipping", "ClipStats"]

log = logging.getLogger(__name__)

_FUNCTIONAL_RELUS = (torch.relu, F.relu)


def _check_limit(limit: object) -> float:
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise TypeError(f"limit must be a positive number, got {type(limit).__name__} {limit!r}")
    if not math.isfinite(limit) or limit <= 0:
        raise ValueError(f"limit must be a positive finite number (6.0 gives ReLU6), got {limit!r}")
    return float(limit)


class BoundedReLU(nn.Module):
    """``y = min(max(x, 0), limit)``: ReLU clipped at ``limit``.

    Attributes:
        limit: the bound (a float; with per-channel limits, the largest of them).
        channel_limits: ``None``, or a buffer of per-channel bounds shaped to broadcast against the
            input (``[C]`` after a Linear, ``[C, 1, 1]`` after a Conv2d). Cross-layer equalization
            rescales channels and keeps the function exact this way (:meth:`scale_channels`).
    """

    def __init__(self, limit: float = 6.0) -> None:
        super().__init__()
        self.limit = _check_limit(limit)
        self.register_buffer("channel_limits", None)

    def scale_channels(self, factor: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Bound channel ``i`` at ``limit_i * factor[i]`` (``factor > 0``), limits broadcast as ``shape``."""
        factor = factor.detach().to(torch.float64).reshape(shape)
        base = self.channel_limits.to(torch.float64) if self.channel_limits is not None else torch.full_like(factor, self.limit)
        if base.shape != factor.shape:
            raise ValueError(f"per-channel limits of shape {tuple(base.shape)} cannot be scaled by shape {tuple(shape)}")
        new = base * factor
        self.channel_limits = new.float()
        self.limit = float(new.max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_limits is None:
            return F.hardtanh(x, 0.0, self.limit)
        return torch.minimum(x.clamp_min(0), self.channel_limits.to(x.dtype))

    def extra_repr(self) -> str:
        if self.channel_limits is None:
            return f"limit={self.limit:g}"
        return f"limit=per-channel({tuple(self.channel_limits.shape)}, max {self.limit:g})"


def _replace_modules(model: nn.Module, limit: float) -> list[str]:
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.ReLU:
                setattr(module, child_name, BoundedReLU(limit))
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BoundedReLU) or super().is_leaf_module(m, qualname)


def _replace_functional(model: nn.Module, limit: float) -> tuple[nn.Module, list[str]]:
    graph = _Tracer().trace(model)
    replaced = []
    for node in list(graph.nodes):
        is_relu = ((node.op == "call_function" and node.target in _FUNCTIONAL_RELUS)
                   or (node.op == "call_method" and node.target == "relu"))
        if not is_relu or node.kwargs.get("inplace") or (len(node.args) > 1 and node.args[1] is True):
            continue
        name = f"bounded_relu_{len(replaced)}"
        while hasattr(model, name):
            name += "_"
        model.add_module(name, BoundedReLU(limit))
        with graph.inserting_after(node):
            new = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced.append(name)
    if not replaced:
        return model, replaced
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__), replaced


def bound_activations(model: nn.Module, limit: float = 6.0, functional: bool = False) -> nn.Module:
    """A copy of ``model`` whose ReLUs clip at ``limit``; ``model`` itself is not modified.

    Every ``nn.ReLU`` module becomes :class:`BoundedReLU` ``(limit)``. With ``functional=True``
    the copy is also traced with ``torch.fx`` and ``torch.relu`` / ``F.relu`` / ``x.relu()`` calls
    become ``BoundedReLU`` submodules; the result is then a ``torch.fx.GraphModule`` (it computes
    the same function but loses the model's own methods), so this is opt-in. Without it,
    functional ReLUs stay unbounded and are reported in the log.

    Returns the copy; the names of the replaced ReLUs are in ``copy.lowbit_bounded``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    limit = _check_limit(limit)
    out = copy.deepcopy(model)
    replaced = _replace_modules(out, limit)
    if functional:
        try:
            out, extra = _replace_functional(out, limit)
        except Exception as e:  # noqa: BLE001 - fx cannot trace data-dependent control flow
            raise ValueError(f"functional=True needs a model torch.fx can trace ({type(e).__name__}: {e}); "
                             "use nn.ReLU modules instead of F.relu calls, or functional=False") from e
        replaced += extra
    elif log.isEnabledFor(logging.INFO):
        try:
            graph = _Tracer().trace(out)
            left = [n.name for n in graph.nodes if (n.op == "call_function" and n.target in _FUNCTIONAL_RELUS)
                    or (n.op == "call_method" and n.target == "relu")]
            if left:
                log.info("lowbit: %d functional ReLU calls stay unbounded (pass functional=True): %s", len(left), left)
        except Exception:  # noqa: BLE001 - only informative
            pass
    if not replaced:
        log.warning("lowbit: bound_activations found no nn.ReLU in %s", type(model).__name__)
    out.lowbit_bounded = replaced
    return out


@dataclass
class ClipStats:
    """How often one ReLU's output exceeded the limit on the data seen."""

    total: int
    clipped: int
    max_value: float

    @property
    def fraction(self) -> float:
        return self.clipped / self.total if self.total else 0.0


@torch.no_grad()
def activation_clipping(model: nn.Module, batches: Iterable, limit: float = 6.0) -> dict[str, ClipStats]:
    """Per ReLU module, how many activations a bound at ``limit`` clips on ``batches``.

    Looks at ``nn.ReLU`` modules (their outputs ``> limit``) and :class:`BoundedReLU` modules
    (their inputs ``> limit``, i.e. what the bound actually clips, using their own limit when
    they already have one). Run it on the float model with calibration data to choose ``limit``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    limit = _check_limit(limit)
    data = _batches.as_batches(batches)
    stats: dict[str, ClipStats] = {}
    hooks = []

    def hook_for(name: str, bounded: bool):
        def hook(mod, inp, out):
            x = inp[0] if bounded else out
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return
            lim = (mod.channel_limits.to(x.dtype) if mod.channel_limits is not None else mod.limit) if bounded else limit
            s = stats.setdefault(name, ClipStats(0, 0, 0.0))
            s.total += x.numel()
            s.clipped += int((x > lim).sum())
            if x.numel():
                s.max_value = max(s.max_value, float(x.max()))
        return hook

    for name, m in model.named_modules():
        if type(m) is nn.ReLU or isinstance(m, BoundedReLU):
            hooks.append(m.register_forward_hook(hook_for(name, isinstance(m, BoundedReLU))))
    if not hooks:
        raise ValueError("model has no nn.ReLU or BoundedReLU module to measure")
    was_training = model.training
    model.eval()
    device = _batches.model_device(model)
    try:
        for b in data:
            _batches.call(model, b, device)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats
