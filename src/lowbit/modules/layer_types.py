"""What a float layer is: which quantized class replaces it, or why it stays float.

Each quantized layer class says which float layers it takes (:meth:`QuantLayer.accepts`), which
library class their forward comes from (:meth:`QuantLayer.base_type`) and how to see their weight
as a GEMM ``[out, in...]`` (:meth:`QuantLayer.float_gemm_weight`); this module only asks the
registered classes (:data:`~lowbit.modules.layer.LAYER_REGISTRY`, filled as each class is defined;
``lowbit.modules`` imports every module of its package). Where several accept a module, the one
whose base class is the most derived wins. A new layer type is one module in :mod:`lowbit.modules`.

Subclasses of ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` (and of transformers' ``Conv1D``) are the
layer they derive from when they keep its forward. A subclass that overrides ``forward`` is
quantized only if it has no parameter or submodule beyond ``weight``/``bias`` and computes the
base layer's function on a random probe input (relative error <= 1e-5); otherwise it stays float
with the reason. A Linear-like module that stays float is reported at WARNING by ``lb.quantize``.
"""
from __future__ import annotations

import torch
from torch import nn

from .hf_conv1d import hf_conv1d_base
from .layer import LAYER_REGISTRY, QuantLayer
from .linear import QuantLinear

__all__ = ["LAYER_CLASSES", "layer_class", "quant_class_for", "make_quant_layer", "check_finite_weight", "is_linear_like",
           "float_gemm_weight", "linear_features"]

LAYER_CLASSES = LAYER_REGISTRY   # the registered quantized layer classes (a live list)


def layer_class(module: nn.Module) -> type[QuantLayer] | None:
    """The quantized class whose float layer ``module`` is (by type alone: no check of its forward), or None."""
    found = [cls for cls in LAYER_REGISTRY if cls.accepts(module)]
    if not found:
        return None
    return max(found, key=lambda cls: len(cls.base_type(module).__mro__))   # most derived base first


_kind = layer_class


def _probe_input(module: nn.Module, cls: type[QuantLayer]) -> torch.Tensor:
    return cls.probe_input(module, 3 if cls.channel_dim == -1 else 2)


def _reference(module: nn.Module, cls: type[QuantLayer], x: torch.Tensor) -> torch.Tensor:
    if cls.channel_dim == -1:
        return torch.nn.functional.linear(x, cls.float_gemm_weight(module), module.bias)
    return cls.base_type(module).forward(module, x)


def _forward_differs(module: nn.Module, cls: type[QuantLayer]) -> str | None:
    """None if ``module`` computes its base layer's function, else why not."""
    base = cls.base_type(module)
    if type(module).forward is base.forward:
        return None
    extra = [n for n, _ in module.named_parameters() if n not in ("weight", "bias")]
    children = [n for n, _ in module.named_children()]
    name = type(module).__name__
    if extra or children:
        return (f"{name} overrides {base.__name__}.forward and holds {', '.join(extra + children)}; "
                f"lowbit cannot tell what it computes")
    try:
        with torch.no_grad():
            x = _probe_input(module, cls)
            got, want = module(x), _reference(module, cls, x)
    except Exception as e:  # noqa: BLE001 - any failure means "not the base layer's function"
        return f"{name} overrides {base.__name__}.forward (a probe input failed: {type(e).__name__}: {e})"
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return f"{name} overrides {base.__name__}.forward and returns something else than {base.__name__}"
    err = (got.float() - want.float()).abs().max().item()
    if not err <= 1e-5 * max(want.float().abs().max().item(), 1e-6):
        return f"{name} overrides {base.__name__}.forward and computes another function (probe error {err:.2g})"
    return None


def quant_class_for(module: nn.Module) -> tuple[type[QuantLayer] | None, str | None]:
    """``(quantized class, None)``, or ``(None, why it stays float)``, or ``(None, None)`` if ``module``
    is not a layer lowbit quantizes at all (a norm, an activation, a container)."""
    cls = _kind(module)
    if cls is None:
        return None, None
    why = _forward_differs(module, cls)
    return (None, why) if why is not None else (cls, None)


def make_quant_layer(cls: type[QuantLayer], module: nn.Module, *args, **kwargs) -> QuantLayer:
    """``cls.from_float(module, ...)``, recording the float class (a subclass is saved as itself)."""
    layer = cls.from_float(module, *args, **kwargs)
    layer.float_type = type(module)
    return layer


def is_linear_like(module: nn.Module) -> bool:
    """A layer computing ``x @ W^T + b`` on the last dimension: ``nn.Linear`` (or a subclass), transformers'
    ``Conv1D``, or a module whose class name ends in ``Linear`` and holds a 2-D ``weight``."""
    if isinstance(module, (nn.Linear, QuantLinear)) or hf_conv1d_base(module) is not None:
        return True
    w = getattr(module, "weight", None)
    return type(module).__name__.endswith("Linear") and isinstance(w, torch.Tensor) and w.dim() == 2


def float_gemm_weight(module: nn.Module) -> torch.Tensor:
    """The float layer's weight as ``[out, in...]`` (a view: in-place edits reach the layer)."""
    cls = _kind(module)
    return module.weight if cls is None else cls.float_gemm_weight(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear-like float layer."""
    out, inp = float_gemm_weight(module).shape[:2]
    return int(inp), int(out)


def check_finite_weight(name: str, module: nn.Module) -> None:
    """``ValueError`` naming ``name`` if ``module.weight`` holds NaN or Inf (no grid can represent them:
    an infinite range makes every other weight of its row round to zero)."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point() and w.device.type != "meta":   # meta: no values yet
        with torch.no_grad():   # in slices of rows: isfinite on a whole table makes float copies of it
            w = w.detach()
            rows = max(1, (1 << 22) // max(1, w[0].numel())) if w.dim() else 1
            parts = w.split(rows) if w.dim() else (w,)
            bad = sum(int((~torch.isfinite(part)).sum()) for part in parts)
        if bad:
            raise ValueError(f"module {name!r}: its weight holds {bad} NaN/Inf values, which no integer grid represents; "
                             f"repair the weights (torch.nan_to_num) or keep the layer float with exclude=[{name!r}]")
