"""Certified predictions: a per-input bound on how far quantization can move the logits.

``logit_bound(float_model, q, x)`` traces ``q`` with ``torch.fx`` (quantized layers are leaves) and
walks its graph, carrying for every value the float activation ``a`` and an elementwise bound
``E`` on the quantized model's deviation from it (the forward interval pass of
:mod:`.bound_rules`). A backward pass from each logit composes the layers' linear error maps and
relaxations (CROWN-style) for a tighter bound; the smaller of the two is kept (both are sound).
At the output::

    |z_q,k - z_float,k| <= B_k + |a_k - z_float,k|        (a: float64 float model, BN folded;
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
from .bound_back import Lin
from .bound_dispatch import function_rule, method_rule, module_rule
from .bound_rules import ROUNDING, V, Unsupported, arith, unit_roundoff
from .probe import weight_pairs

__all__ = ["BoundResult", "logit_bound"]

MAX_BACKWARD_OUTPUTS = 64      # logits per input the backward pass bounds (2 objectives each)
CHUNK_ELEMENTS = 1 << 24       # (objectives x inputs x activation size) per backward chunk


@dataclass
class BoundResult:
    """Per-input bound on ``max_k |z_q,k - z_float,k|`` and what it certifies.

    Attributes:
        bound: float64 ``[N]`` (``inf`` where unavailable).
        measured: the actual ``max_k |z_q,k - z_float,k|`` per input (never above ``bound``).
        margin: float top-1 minus top-2 logit per input (NaN for outputs that are not ``[N, C]``).
        certified: bool ``[N]``, ``margin > 2 * bound``.
        unsupported: the nodes (or the tracing failure) that made the bound unavailable.
        interval_bound: the forward (interval) bound alone, for comparison.
    """

    bound: torch.Tensor
    measured: torch.Tensor
    margin: torch.Tensor
    certified: torch.Tensor
    unsupported: list[str] = field(default_factory=list)
    interval_bound: torch.Tensor | None = None

    @property
    def available(self) -> bool:
        return not self.unsupported

    @property
    def certified_fraction(self) -> float:
        return float(self.certified.double().mean()) if self.certified.numel() else 0.0

    def as_dict(self) -> dict:
        """Summary numbers (no per-input tensors)."""
        def med(t):
            return float(t.median()) if t is not None and t.numel() else float("nan")
        ok = torch.isfinite(self.bound)
        ratio = (self.measured[ok] / self.bound[ok].clamp_min(1e-300)) if bool(ok.any()) else torch.zeros(0)
        return {"available": self.available, "unsupported": list(self.unsupported), "inputs": int(self.bound.numel()),
                "certified_fraction": self.certified_fraction, "bound_median": med(self.bound),
                "interval_bound_median": med(self.interval_bound), "measured_median": med(self.measured),
                "tightness_median": med(ratio), "violations": int((self.measured > self.bound).sum())}


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
        if v.is_tensor and not v.exact and bool((v.err() > 0).any()):
            raise Unsupported("a tensor carrying quantization error is used as a parameter")
        return v.a
    return v


class _Walk:
    """One forward pass over the graph for a batch ``x``; keeps each node's backward map."""

    def __init__(self, q: nn.Module, graph: fx.Graph, pairs: dict, x: torch.Tensor, rounding: str) -> None:
        self.q, self.graph, self.pairs, self.x, self.rounding = q, graph, pairs, x, rounding
        self.u = unit_roundoff(x.dtype, x.device)
        self.env: dict[fx.Node, V] = {}
        self.backs: dict[fx.Node, tuple] = {}      # node -> (Back, [input nodes])
        self.unsupported: list[str] = []
        self.input_node: fx.Node | None = None
        self.out_node: fx.Node | None = None

    def run(self) -> V | None:
        out = None
        for node in self.graph.nodes:
            try:
                out = self._node(node) if node.op != "output" else self._output(node)
            except Unsupported as e:
                self.unsupported.append(f"{_describe(node, self.q)}: {e}")
                self.env[node] = _POISON
        return None if self.unsupported else out

    def _resolve(self, node):
        args = map_aggregate(node.args, lambda n: self.env[n] if isinstance(n, fx.Node) else n)
        kwargs = map_aggregate(node.kwargs, lambda n: self.env[n] if isinstance(n, fx.Node) else n)
        poisoned = []
        map_aggregate((args, kwargs), lambda v: poisoned.append(v) if v is _POISON else None)
        return args, kwargs, bool(poisoned)

    def _node(self, node: fx.Node):
        rule = None
        if node.op == "call_module":
            rule = module_rule(self.q.get_submodule(node.target), self.pairs, node.target, self.x.dtype,
                               self.x.device, self.rounding)
        elif node.op == "call_function":
            rule = function_rule(node.target, node.args, node.kwargs, self.u)
        elif node.op == "call_method":
            rule = method_rule(node.target, self.u)
        args, kwargs, poisoned = self._resolve(node)
        if poisoned:
            self.env[node] = _POISON
            return None
        if node.op == "placeholder":
            if self.input_node is None:
                self.input_node = node
                self.env[node] = V(self.x.detach().double())
            elif node.args:
                self.env[node] = V(node.args[0])
            else:
                raise Unsupported("a second required input; logit_bound takes one input tensor")
            return None
        if node.op == "get_attr":
            t = self.q
            for part in node.target.split("."):
                t = getattr(t, part)
            self.env[node] = V(t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            return None
        v, back, inputs = self._apply(node, rule, args, kwargs)
        self.env[node] = v
        if back is not None:
            self.backs[node] = (back, inputs)
        return None

    def _output(self, node: fx.Node):
        target = node.args[0]
        if isinstance(target, (tuple, list)):
            target = next((t for t in target if isinstance(t, fx.Node) and self.env[t].is_tensor), None)
        elif isinstance(target, dict):
            target = next((t for t in target.values() if isinstance(t, fx.Node) and self.env[t].is_tensor), None)
        if not isinstance(target, fx.Node) or self.env[target] is _POISON:
            if isinstance(target, fx.Node):
                return None
            raise Unsupported("the model output is not a tensor")
        if not self.env[target].is_tensor:
            raise Unsupported("the model output is not a tensor")
        self.out_node = target
        return self.env[target]

    def _tensor_node(self, arg) -> bool:
        return isinstance(arg, fx.Node) and self.env.get(arg) is not None and self.env[arg].is_tensor

    def _apply(self, node: fx.Node, rule, args: tuple, kwargs: dict):
        if node.op == "call_module":
            if len(args) != 1 or kwargs or not isinstance(args[0], V) or not args[0].is_tensor:
                raise Unsupported("called with other than one tensor argument")
            v, back = rule(args[0])
            return v, back, [node.args[0]]
        if rule == "value":
            a = [_plain(v) for v in args]
            if node.target is operator.getitem and isinstance(a[0], torch.Tensor):
                x, idx = args[0], a[1]
                return V(x.a[idx], x.l()[idx], x.h()[idx]), Lin(lambda d: d[idx], [torch.zeros_like(x.a)]), [node.args[0]]
            res = getattr(a[0], node.target)(*a[1:]) if node.op == "call_method" else node.target(*a)
            if isinstance(res, torch.Tensor):
                raise Unsupported("produces a tensor from an attribute")
            return V(res), None, []
        if rule == "arith":
            fn = node.target if node.op == "call_function" else _ARITH_METHODS[node.target]
            x, y = (v if isinstance(v, V) else V(v) for v in args[:2])
            if not (x.is_tensor or y.is_tensor):
                return V(fn(x.a, y.a)), None, []
            x_in, y_in = self._tensor_node(node.args[0]), self._tensor_node(node.args[1])
            v, back = arith(fn, x, y, self.u, x_in, y_in)
            return v, back, [n for n, use in ((node.args[0], x_in), (node.args[1], y_in)) if use]
        if rule == "cat":
            tensors = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if not all(self._tensor_node(n) for n in node.args[0]):
                raise Unsupported("torch.cat of values that are not graph tensors")
            v = V(torch.cat([t.a for t in tensors], dim), torch.cat([t.l() for t in tensors], dim),
                  torch.cat([t.h() for t in tensors], dim))
            back = Lin(lambda *ds: torch.cat(ds, dim), [torch.zeros_like(t.a) for t in tensors])
            return v, back, list(node.args[0])
        x = args[0]
        if not isinstance(x, V) or not x.is_tensor:
            raise Unsupported("the first argument is not a tensor")
        rest = [_plain(v) for v in args[1:]]
        kw = {k: _plain(v) for k, v in kwargs.items()}
        v, back = rule(x, rest, kw)
        return v, back, [node.args[0]]

    def backward(self, k_max: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Upper bounds on ``z_q - a_out`` and on ``a_out - z_q`` (each shaped like the output) from the
        linear relaxations, or None for outputs with more than ``k_max`` values per input."""
        out = self.env[self.out_node]
        n = out.a.shape[0]
        c = out.a[0].numel()
        if c > k_max:
            return None
        eye = torch.eye(c, dtype=out.a.dtype, device=out.a.device).reshape(c, 1, *out.a.shape[1:])
        lam0 = torch.cat([eye, -eye]).expand(2 * c, n, *out.a.shape[1:])
        lams = {self.out_node: lam0}
        total = torch.zeros(2 * c, n, dtype=out.a.dtype, device=out.a.device)
        for node in reversed(list(self.graph.nodes)):
            lam = lams.pop(node, None)
            if lam is None:
                continue
            if node not in self.backs:
                v = self.env[node]
                if node is self.input_node or v.exact:
                    continue      # the input and constants carry no error
                total = total + torch.maximum(lam * v.l(), lam * v.h()).reshape(2 * c, n, -1).sum(-1)
                continue
            back, inputs = self.backs[node]
            ins, k = back.back(lam)
            total = total + k
            for inp, li in zip(inputs, ins):
                lams[inp] = li if inp not in lams else lams[inp] + li
        return total[:c].transpose(0, 1).reshape(out.a.shape), total[c:].transpose(0, 1).reshape(out.a.shape)


def _chunks(q: nn.Module, graph: fx.Graph, pairs: dict, x: torch.Tensor, per: int, rounding: str):
    for i in range(0, x.shape[0], per):
        walk = _Walk(q, graph, pairs, x[i:i + per], rounding)
        yield walk, walk.run()


@torch.no_grad()
def logit_bound(float_model: nn.Module, q: nn.Module, x: torch.Tensor, rounding: str = "worst",
                backward: bool | str = "auto") -> BoundResult:
    """Per-input bound on ``max_k |q(x)_k - float_model(x)_k|``, and the certified inputs.

    Args:
        x: one batch (a tensor ``[N, ...]``); both models are evaluated in eval mode.
        rounding: ``"worst"`` (default): every activation rounding is an adversary within half a
            step (the certificate holds for any round-to-nearest implementation of the same grids,
            e.g. an integer kernel); ``"exact"``: the rounding ``q`` itself performs (a validated
            enclosure of this computation, much tighter, valid for ``q`` only).
        backward: also run the backward (linear-relaxation) pass (True), or not (False: the
            interval bound only); ``"auto"`` runs it on the first chunk of inputs and keeps it
            only if it tightens at least a tenth of their bounds by 10% or more.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor batch [N, ...]; logit_bound takes a single input tensor")
    if rounding not in ROUNDING:
        raise ValueError(f"rounding must be one of {ROUNDING}, got {rounding!r}")
    if backward not in (True, False, "auto"):
        raise ValueError(f"backward must be True, False or 'auto', got {backward!r}")
    pairs = weight_pairs(float_model, q)
    modes = [(m, m.training) for m in (float_model, q)]
    float_model.eval()
    q.eval()
    n = x.shape[0]
    unsupported: list[str] = []
    bounds, ibounds = [], []
    try:
        z_float = output_tensor(float_model(x)).double()
        z_q = output_tensor(q(x)).double()
        try:
            graph = _Tracer().trace(q)
        except Exception as e:  # noqa: BLE001 - any tracing failure means "unsupported", named
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            unsupported.append(f"{type(q).__name__}: torch.fx cannot trace it ({first}); models with "
                               "data-dependent control flow are not supported")
            graph = None
        if graph is not None:
            use_backward = backward is True or backward == "auto"
            per = _chunk_size(z_float, x, use_backward)
            for i, (walk, out) in enumerate(_chunks(q, graph, pairs, x, per, rounding)):
                if out is None:
                    unsupported.extend(walk.unsupported)
                    break
                zf = z_float[i * per:(i + 1) * per]
                if out.a.shape != zf.shape:
                    unsupported.append(f"output: traced shape {tuple(out.a.shape)} differs from the model's "
                                       f"{tuple(zf.shape)}")
                    break
                lo, hi = out.l(), out.h()
                gap = (out.a - zf).abs()
                ibounds.append(_per_input(torch.maximum(lo.abs(), hi.abs()) + gap))
                if use_backward:
                    rel = walk.backward(MAX_BACKWARD_OUTPUTS)
                    if rel is not None:
                        hi, lo = torch.minimum(hi, rel[0]), torch.maximum(lo, -rel[1])
                bounds.append(_per_input(torch.maximum(lo.abs(), hi.abs()) + gap))
                if backward == "auto" and i == 0 and use_backward:
                    # keep paying for the backward pass only where it tightens the first chunk's bound
                    use_backward = bool((bounds[0] < 0.9 * ibounds[0]).double().mean() > 0.1)
    finally:
        for m, was in modes:
            m.train(was)
    flat_f, flat_q = z_float.reshape(n, -1), z_q.reshape(n, -1)
    measured = (flat_q - flat_f).abs().amax(dim=1)
    if unsupported or not bounds:
        bound = torch.full((n,), torch.inf, dtype=torch.float64, device=x.device)
        ibound = bound
    else:
        bound, ibound = torch.cat(bounds), torch.cat(ibounds)
    if z_float.dim() == 2 and z_float.shape[1] >= 2:
        top = z_float.topk(2, dim=1).values
        margin = top[:, 0] - top[:, 1]
    else:
        margin = torch.full((n,), torch.nan, dtype=torch.float64, device=x.device)
    return BoundResult(bound=bound, measured=measured, margin=margin, certified=margin > 2 * bound,
                       unsupported=list(dict.fromkeys(unsupported)), interval_bound=ibound)


def _per_input(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).amax(dim=1) * (1 + 1e-9)


def _chunk_size(z: torch.Tensor, x: torch.Tensor, backward: bool) -> int:
    n = x.shape[0]
    if not backward:
        return n
    k = 2 * max(1, z[0].numel())
    width = max(1, x[0].numel()) * 64     # a generous guess of the widest activation per input
    return max(1, min(n, CHUNK_ELEMENTS // (k * width)))
