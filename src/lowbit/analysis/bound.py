"""Certified predictions: a per-input bound on how far quantization can move the logits.

``logit_bound(float_model, q, x)`` traces ``q`` with ``torch.fx`` (quantized layers are leaves) and
walks its graph, carrying for every value the float activation ``a`` and an elementwise bound
``E`` on the quantized model's deviation from it (rules in :mod:`.bound_rules`). At the output::

    |z_q,k - z_float,k| <= E_k + |a_k - z_float,k|        (a: float64 float model, BN folded;
                                                            the second term is measured)

and the bound of an input is ``B = max_k`` of the right side. It is *sound*: it accounts for every
rounding and clipping of the quantizers (exactly, through their monotonicity, given ``x``), for the
weight error, and for the float32 roundoff of both models. An input whose float top-1 margin
``z_(1) - z_(2)`` exceeds ``2 B`` is *certified*: every logit moves by at most ``B``, so the
quantized model provably predicts the same class.

Nodes without a rule (attention, normalisation layers other than BatchNorm, GELU, ...) are named
in ``BoundResult.unsupported`` and the bound is then ``inf``; a model ``torch.fx`` cannot trace
(data-dependent control flow) is reported the same way, never silently skipped.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

from ..modules import QuantLayer, Quantizer
from .batches import output_tensor
from .bound_rules import V, Unsupported, arith, function_rule, method_rule, module_rule, unit_roundoff
from .probe import weight_pairs

__all__ = ["BoundResult", "logit_bound"]


@dataclass
class BoundResult:
    """Per-input bound on ``max_k |z_q,k - z_float,k|`` and what it certifies.

    Attributes:
        bound: float64 ``[N]`` (``inf`` where unavailable).
        measured: the actual ``max_k |z_q,k - z_float,k|`` per input (never above ``bound``).
        margin: float top-1 minus top-2 logit per input (NaN for outputs that are not ``[N, C]``).
        certified: bool ``[N]``, ``margin > 2 * bound``.
        unsupported: the nodes (or the tracing failure) that made the bound unavailable.
    """

    bound: torch.Tensor
    measured: torch.Tensor
    margin: torch.Tensor
    certified: torch.Tensor
    unsupported: list[str] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return not self.unsupported

    @property
    def certified_fraction(self) -> float:
        return float(self.certified.double().mean()) if self.certified.numel() else 0.0

    def as_dict(self) -> dict:
        """Summary numbers (no per-input tensors)."""
        ok = torch.isfinite(self.bound)
        ratio = (self.measured[ok] / self.bound[ok].clamp_min(1e-300)) if bool(ok.any()) else torch.zeros(0)
        return {"available": self.available, "unsupported": list(self.unsupported), "inputs": int(self.bound.numel()),
                "certified_fraction": self.certified_fraction,
                "bound_median": float(self.bound.median()) if self.bound.numel() else float("nan"),
                "measured_median": float(self.measured.median()) if self.measured.numel() else float("nan"),
                "tightness_median": float(ratio.median()) if ratio.numel() else float("nan"),
                "violations": int((self.measured > self.bound).sum())}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantLayer, Quantizer)) or super().is_leaf_module(m, qualname)


_POISON = V(None)
_ARITH_METHODS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}


def _describe(node: fx.Node, q: nn.Module) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(q.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"{node.name} ({getattr(node.target, '__qualname__', node.target)})"
    return f"{node.name} ({node.op} {node.target})"


def _plain(v):
    """A resolved argument as a plain value (tensors without error only)."""
    if isinstance(v, V):
        if v.is_tensor and v.e is not None and bool((v.e > 0).any()):
            raise Unsupported("a tensor carrying quantization error is used as a parameter")
        return v.a
    return v


def _propagate(q: nn.Module, graph: fx.Graph, pairs: dict, x: torch.Tensor, unsupported: list[str]) -> V | None:
    env: dict[fx.Node, V] = {}
    u = unit_roundoff(x.dtype, x.device)
    seen_input = False
    out = None
    for node in graph.nodes:
        try:
            rule = None
            if node.op == "call_module":
                rule = module_rule(q.get_submodule(node.target), pairs, node.target, x.dtype, x.device)
            elif node.op == "call_function":
                rule = function_rule(node.target, node.args, node.kwargs, u)
            elif node.op == "call_method":
                rule = method_rule(node.target, u)
            args = map_aggregate(node.args, lambda n: env[n] if isinstance(n, fx.Node) else n)
            kwargs = map_aggregate(node.kwargs, lambda n: env[n] if isinstance(n, fx.Node) else n)
            poisoned = []
            map_aggregate((args, kwargs), lambda v: poisoned.append(v) if v is _POISON else None)
            if poisoned:
                env[node] = _POISON
                continue
            if node.op == "placeholder":
                if not seen_input:
                    env[node], seen_input = V(x.detach().double(), torch.zeros_like(x, dtype=torch.float64)), True
                elif node.args:
                    env[node] = V(node.args[0])
                else:
                    raise Unsupported("a second required input; logit_bound takes one input tensor")
            elif node.op == "get_attr":
                t = q
                for part in node.target.split("."):
                    t = getattr(t, part)
                env[node] = V(t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            elif node.op == "output":
                out = args[0]
                if isinstance(out, (tuple, list)):
                    out = next((v for v in out if isinstance(v, V) and v.is_tensor), None)
                elif isinstance(out, dict):
                    out = next((v for v in out.values() if isinstance(v, V) and v.is_tensor), None)
                if not isinstance(out, V) or not out.is_tensor:
                    raise Unsupported("the model output is not a tensor")
            else:
                env[node] = _apply(node, rule, args, kwargs, u)
        except Unsupported as e:
            unsupported.append(f"{_describe(node, q)}: {e}")
            env[node] = _POISON
    return None if unsupported else out


def _apply(node: fx.Node, rule, args: tuple, kwargs: dict, u: float) -> V:
    if node.op == "call_module":
        if len(args) != 1 or kwargs or not isinstance(args[0], V) or not args[0].is_tensor:
            raise Unsupported("called with other than one tensor argument")
        return rule(args[0])
    if rule == "value":
        a = [_plain(v) for v in args]
        if node.target is operator.getitem and isinstance(a[0], torch.Tensor):
            x = args[0]
            return V(x.a[a[1]], x.err()[a[1]])
        res = getattr(a[0], node.target)(*a[1:]) if node.op == "call_method" else node.target(*a)
        if isinstance(res, torch.Tensor):
            raise Unsupported("produces a tensor from an attribute")
        return V(res)
    if rule == "arith":
        fn = node.target if node.op == "call_function" else _ARITH_METHODS[node.target]
        x, y = (v if isinstance(v, V) else V(v) for v in args[:2])
        if not (x.is_tensor or y.is_tensor):
            return V(fn(x.a, y.a))
        return arith(fn, x, y, u)
    if rule == "cat":
        tensors = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return V(torch.cat([t.a for t in tensors], dim), torch.cat([t.err() for t in tensors], dim))
    x = args[0]
    if not isinstance(x, V) or not x.is_tensor:
        raise Unsupported("the first argument is not a tensor")
    rest = [_plain(v) for v in args[1:]]
    kw = {k: _plain(v) for k, v in kwargs.items()}
    return rule(x, rest, kw)


@torch.no_grad()
def logit_bound(float_model: nn.Module, q: nn.Module, x: torch.Tensor) -> BoundResult:
    """Per-input bound on ``max_k |q(x)_k - float_model(x)_k|``, and the certified inputs.

    ``x`` is one batch (a tensor ``[N, ...]``); both models are evaluated in eval mode.
    See the module docstring for the math.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor batch [N, ...]; logit_bound takes a single input tensor")
    pairs = weight_pairs(float_model, q)
    modes = [(m, m.training) for m in (float_model, q)]
    float_model.eval()
    q.eval()
    try:
        z_float = output_tensor(float_model(x)).double()
        z_q = output_tensor(q(x)).double()
        unsupported: list[str] = []
        try:
            graph = _Tracer().trace(q)
        except Exception as e:  # noqa: BLE001 - any tracing failure means "unsupported", named
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            unsupported.append(f"{type(q).__name__}: torch.fx cannot trace it ({first}); models with "
                               "data-dependent control flow are not supported")
            graph = None
        out = _propagate(q, graph, pairs, x, unsupported) if graph is not None else None
    finally:
        for m, was in modes:
            m.train(was)
    n = z_float.shape[0]
    flat_f, flat_q = z_float.reshape(n, -1), z_q.reshape(n, -1)
    measured = (flat_q - flat_f).abs().amax(dim=1)
    if out is None or out.a.shape != z_float.shape:
        if out is not None:
            unsupported.append(f"output: traced shape {tuple(out.a.shape)} differs from the model's {tuple(z_float.shape)}")
        bound = torch.full((n,), torch.inf, dtype=torch.float64, device=x.device)
    else:
        total = out.e + (out.a - z_float).abs()
        bound = total.reshape(n, -1).amax(dim=1) * (1 + 1e-9)
    if z_float.dim() == 2 and z_float.shape[1] >= 2:
        top = z_float.topk(2, dim=1).values
        margin = top[:, 0] - top[:, 1]
    else:
        margin = torch.full((n,), torch.nan, dtype=torch.float64, device=x.device)
    certified = margin > 2 * bound
    return BoundResult(bound=bound, measured=measured, margin=margin, certified=certified, unsupported=unsupported)
