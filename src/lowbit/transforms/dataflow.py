"""Who reads a normalization layer's output: the dataflow SmoothQuant needs to fold safely.

Folding a per-channel factor ``1/s`` into a LayerNorm/RMSNorm (``gamma / s``, ``beta / s``) changes
*every* reader of its output, so it is exact only when the readers are linear layers that absorb
``s`` into their weight columns. In a pre-LN transformer (OPT, BLOOM, LLaMA) that holds: the norm
output feeds only the Q/K/V (or FFN-up) projections. In a post-LN transformer (BERT, MiniLM) the
norm output is also the residual branch (``LayerNorm(x + sublayer(x))`` then ``h + attn(h)``), so
it must not be folded.

:func:`trace_linear_inputs` runs the model on calibration batches under a
:class:`torch.overrides.TorchFunctionMode` and records, for every ``nn.Linear``:

* ``producer``: the norm module whose output it reads (directly or through dropout / ``.to`` /
  ``.contiguous`` / a reshape that keeps the last dimension), or None;
* the per-input-channel maximum ``max |X_j|`` over all batches and tokens;

and for every norm module the readers of its output that are *not* linear layers (an add, an
indexing op, ...). Operations that return no tensor (``.shape``, ``.dim()``) are not readers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..modules import QuantLayer, QuantLinear, quant_class_for

__all__ = ["LinearInput", "Dataflow", "trace_linear_inputs", "is_norm", "norm_offset", "linear_layers"]

_ALIAS = {F.dropout, torch.dropout, torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float,
          torch.Tensor.detach}
_RESHAPE = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape}


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The float layers computing ``x @ W^T + b`` on the last dimension, by name: ``nn.Linear`` and
    subclasses that keep its function, transformers' ``Conv1D`` (see :mod:`lowbit.modules.layer_types`)."""
    out = []
    for n, m in model.named_modules():
        cls, _ = quant_class_for(m)
        if cls is not None and issubclass(cls, QuantLinear) and not isinstance(m, QuantLayer):
            out.append((n, m))
    return out


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float | None:
    """The ``c`` of a norm computing ``n(x) * (c + w) (+ b)``: 0 for LayerNorm/RMSNorm, 1 for
    Gemma-style ``x * (1 + w)`` norms; None if it is neither (found by running it with ``w = 0`` and
    ``w = 1`` on a random input; the weights are restored)."""
    w = norm.weight
    b = getattr(norm, "bias", None)
    b = b if isinstance(b, torch.Tensor) else None
    saved_w, saved_b = w.detach().clone(), None if b is None else b.detach().clone()
    x = torch.randn(4, w.numel(), generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    try:
        w.zero_()
        if b is not None:
            b.zero_()
        y0 = norm(x).float()
        w.fill_(1.0)
        y1 = norm(x).float()
    except Exception:  # noqa: BLE001 - a norm that cannot run on [4, C] is not one we can fold into
        return None
    finally:
        w.copy_(saved_w)
        if b is not None:
            b.copy_(saved_b)
    if not isinstance(y0, torch.Tensor) or y0.shape != x.shape:
        return None
    scale = max(y1.abs().max().item(), 1e-12)
    if y0.abs().max().item() <= 1e-6 * scale:
        return 0.0
    if (y1 - 2 * y0).abs().max().item() <= 1e-4 * scale:
        return 1.0
    return None


def is_norm(m: nn.Module) -> bool:
    """A LayerNorm/RMSNorm-like module with a per-channel affine weight ``gamma`` (last dimension)."""
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return getattr(m, "weight", None) is not None and m.weight.dim() == 1
    name = type(m).__name__
    w = getattr(m, "weight", None)
    return name.endswith(("LayerNorm", "RMSNorm")) and isinstance(w, torch.Tensor) and w.dim() == 1


@dataclass
class LinearInput:
    """What a linear layer reads (see the module docstring)."""

    channel_max: torch.Tensor | None = None
    producers: set = field(default_factory=set)   # norm names, or None for "something else"
    calls: int = 0


@dataclass
class Dataflow:
    linears: dict[str, LinearInput] = field(default_factory=dict)
    other_readers: dict[str, set] = field(default_factory=dict)   # norm name -> names of non-linear readers

    def readers(self) -> dict[str, list[str]]:
        """Norm name -> the linear layers that read its output, in tracing order."""
        out: dict[str, list[str]] = {}
        for name, rec in self.linears.items():
            for p in rec.producers:
                if p is not None:
                    out.setdefault(p, []).append(name)
        return out

    def foldable(self, norm: str, group: list[str]) -> bool:
        """True if ``norm``'s output is read only by the linear layers in ``group``, and they read only it."""
        return (not self.other_readers.get(norm)
                and all(self.linears[n].producers == {norm} for n in group))


def _op_name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


class _Tracer(TorchFunctionMode):
    def __init__(self, linear_of_weight: dict[int, str], flow: Dataflow) -> None:
        super().__init__()
        self.linear_of_weight = linear_of_weight
        self.flow = flow
        self.watched: dict[int, tuple[str, torch.Tensor]] = {}

    def watch(self, t: torch.Tensor, norm: str) -> None:
        self.watched[id(t)] = (norm, t)

    def _producer(self, a) -> str | None:
        hit = self.watched.get(id(a)) if isinstance(a, torch.Tensor) else None
        return hit[0] if hit is not None and hit[1] is a else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear and len(args) >= 2 and id(args[1]) in self.linear_of_weight:
            name = self.linear_of_weight[id(args[1])]
            self._record_linear(name, args[0])
            rest = list(args[2:]) + list(kwargs.values())
        elif func is torch.addmm and len(args) >= 3 and id(args[2]) in self.linear_of_weight:
            # transformers' Conv1D: addmm(bias, x.view(-1, in), W[in, out])
            name = self.linear_of_weight[id(args[2])]
            self._record_linear(name, args[1])
            rest = [args[0]] + list(args[3:]) + list(kwargs.values())
        else:
            rest = list(args) + list(kwargs.values())
        flat, _ = tree_flatten(rest)
        readers = {p for p in (self._producer(a) for a in flat) if p is not None}
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if readers and outs:
            src = flat[0] if flat else None
            alias = func in _ALIAS or (func in _RESHAPE and isinstance(src, torch.Tensor)
                                       and len(outs) == 1 and outs[0].shape[-1:] == src.shape[-1:])
            if alias and len(readers) == 1 and self._producer(src) is not None:
                self.watch(outs[0], next(iter(readers)))
            else:
                for r in readers:
                    self.flow.other_readers.setdefault(r, set()).add(_op_name(func))
        return out

    def _record_linear(self, name: str, x: torch.Tensor) -> None:
        rec = self.flow.linears.setdefault(name, LinearInput())
        rec.calls += 1
        rec.producers.add(self._producer(x))
        if x.numel() == 0:
            return
        with torch.no_grad():
            lo, hi = torch.aminmax(x.detach().reshape(-1, x.shape[-1]), dim=0)
            m = torch.maximum(hi, -lo).float()
        rec.channel_max = m if rec.channel_max is None else torch.maximum(rec.channel_max, m)


def trace_linear_inputs(model: nn.Module, batches: list, call) -> Dataflow:
    """Run ``model`` on every batch (``call(model, batch)``) and return the :class:`Dataflow`.

    The linear layers tracked are those :func:`linear_layers` names (``nn.Linear``, its subclasses that
    keep its function, transformers' ``Conv1D``). The model runs in eval mode, without gradients; its
    parameters are not changed.
    """
    linear_of_weight = {id(m.weight): n for n, m in linear_layers(model)}
    flow = Dataflow()
    tracer = _Tracer(linear_of_weight, flow)

    def hook(name):
        def f(_m, _args, out):
            if isinstance(out, torch.Tensor):
                tracer.watch(out, name)
        return f

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if is_norm(m)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                with tracer:
                    call(model, b)
                tracer.watched.clear()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return flow
