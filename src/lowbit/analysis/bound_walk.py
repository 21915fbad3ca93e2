"""The graph walk of the certified bound: forward intervals, backward relaxations, and refinement.

:class:`Walk` runs over a ``torch.fx`` graph of ``q`` for one batch, applying the rules of
:mod:`.bound_rules` (chosen by :mod:`.bound_dispatch`) node by node and keeping each node's
backward map (:mod:`.bound_back`). :meth:`Walk.backward_from` composes those maps from any node
back to the input (CROWN, Zhang et al., NeurIPS 2018): for objectives ``lam`` on a node's error
``d`` it returns ``c`` with ``sum(lam * d) <= c`` for every admissible rounding.

**Refinement** (``refine=True``). A relaxation (ReLU, ReLU6/Hardtanh, an activation quantizer
whose input may leave its grid's range) is exact where the input's interval lies within one
linear piece, and loose, with a constant growing with the interval, where it straddles a
breakpoint. Intervals compound layer by layer; so before applying such a rule the walk tightens
the intervals of exactly those straddling elements with a backward pass from them (CROWN's
intermediate bounds, restricted to the unstable neurons as in Wang et al., "Beta-CROWN", NeurIPS
2021). Each refined bound is itself sound, so replacing the interval by its intersection with it
is sound; the final bounds then follow the network's linear structure instead of |W| products.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn
import torch.nn.functional as F
from torch.fx.node import map_aggregate

from ..modules import ActQuantizer, QuantLayer, Quantizer
from ..ops.params import broadcast_param
from .bound_back import Lin
from .bound_dispatch import function_rule, method_rule, module_rule
from .bound_rules import V, Unsupported, _pool_windows, arith, maxpool, unit_roundoff

__all__ = ["Walk", "Tracer", "describe"]

CHUNK_ELEMENTS = 1 << 24       # (objectives x inputs x activation size) per backward pass

class Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantLayer, Quantizer)) or super().is_leaf_module(m, qualname)


_POISON = V(None)
_ARITH_METHODS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}


def describe(node: fx.Node, q: nn.Module) -> str:
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


class Walk:
    """One forward pass over the graph for a batch ``x``; keeps each node's backward map."""

    def __init__(self, q: nn.Module, graph: fx.Graph, pairs: dict, x: torch.Tensor, rounding: str,
                 refine: int = 0) -> None:
        self.q, self.graph, self.pairs, self.x, self.rounding = q, graph, pairs, x, rounding
        self.refine = int(refine)            # the most elements per input and node to refine (0: none)
        self.sources: dict[fx.Node, int] = {}   # how many quantized layers' errors reach a node (capped at 2)
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.widest = 1                      # the largest value (elements per input) seen so far
        self.refined = 0                     # elements whose interval a backward pass tightened
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
                self.unsupported.append(f"{describe(node, self.q)}: {e}")
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
        if self.refine:
            args = self._refine_input(node, args)
            rule = self._refined_maxpool(node, rule)
        v, back, inputs = self._apply(node, rule, args, kwargs)
        self.env[node] = v
        src = sum(self.sources.get(i, 0) for i in inputs)
        if node.op == "call_module" and isinstance(self.q.get_submodule(node.target), (QuantLayer, ActQuantizer)):
            src += 1
        self.sources[node] = min(src, 2)
        if v.is_tensor and v.a.dim() >= 1:
            self.widest = max(self.widest, int(v.a[0].numel()) if v.a.shape[0] else 1)
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

    def backward_from(self, start: fx.Node, lam: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        """``c`` ``[K, N]`` with ``sum(lam[k, n] * d_start[n]) <= c[k, n]`` for every admissible rounding.

        ``lam``: ``[K, N, *shape of start]``. ``record``: if a dict, each node's constant term is
        added into ``record[node]`` (``[K, N]``), the share of the bound that node contributes.
        """
        lams = {start: lam}
        total = torch.zeros(lam.shape[:2], dtype=lam.dtype, device=lam.device)
        stop = self.order[start]
        for node in reversed(list(self.graph.nodes)[:stop + 1]):
            lam = lams.pop(node, None)
            if lam is None:
                continue
            if node not in self.backs:
                v = self.env[node]
                if node is self.input_node or v.exact:
                    continue      # the input and constants carry no error
                k = torch.maximum(lam * v.l(), lam * v.h()).reshape(lam.shape[0], lam.shape[1], -1).sum(-1)
            else:
                back, inputs = self.backs[node]
                ins, k = back.back(lam)
                for inp, li in zip(inputs, ins):
                    lams[inp] = li if inp not in lams else lams[inp] + li
            total = total + k
            if record is not None:
                record[node] = k if node not in record else record[node] + k
        return total

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
        total = self.backward_from(self.out_node, lam0)
        return total[:c].transpose(0, 1).reshape(out.a.shape), total[c:].transpose(0, 1).reshape(out.a.shape)

    # -- refinement ----------------------------------------------------------------------------------
    def _breakpoints(self, node: fx.Node) -> list | None:
        """Where the rule of ``node`` stops being linear in its (first) input, or None (no refinement)."""
        if node.op == "call_module":
            m = self.q.get_submodule(node.target)
            if isinstance(m, QuantLayer):
                m = m.input_quant
            if isinstance(m, ActQuantizer):
                return self._quant_breaks(m)
            if type(m) is nn.ReLU:
                return [0.0]
            if isinstance(m, nn.Hardtanh):
                return [float(m.min_val), float(m.max_val)]
            return None
        if node.op == "call_function" and node.target in (F.relu, torch.relu):
            return [0.0]
        if node.op == "call_function" and node.target is F.relu6:
            return [0.0, 6.0]
        if node.op == "call_method" and node.target == "relu":
            return [0.0]
        return None

    def _quant_breaks(self, aq: ActQuantizer) -> list | None:
        if not aq.enabled or aq.scale is None or aq.observing or aq.spec.dynamic:
            return None
        return [aq]          # resolved against the value's shape in _unstable

    def _unstable(self, v: V, breaks: list) -> torch.Tensor:
        """Elements whose interval straddles a breakpoint."""
        lo, hi = v.a + v.l(), v.a + v.h()
        mask = torch.zeros_like(v.a, dtype=torch.bool)
        edges = []
        for b in breaks:
            if isinstance(b, ActQuantizer):   # d_q = d + rho, |rho| <= s/2, holds on [bot - s/2, top + s/2]
                spec = b.spec
                s = broadcast_param(b.scale.double(), v.a.shape, spec)
                z = broadcast_param(b.zero_point.double(), v.a.shape, spec)
                edges += [(spec.qmin - z) * s - s / 2, (spec.qmax - z) * s + s / 2]
            else:
                edges.append(b)
        for edge in edges:
            mask |= (lo < edge) & (hi > edge)
        return mask

    def _refine_input(self, node: fx.Node, args: tuple) -> tuple:
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src is self.input_node or src not in self.env:
            return args
        v = self.env[src]
        if v is _POISON or not v.is_tensor or v.exact or not v.a.is_floating_point() or v.a.dim() < 1:
            return args
        if self.sources.get(src, 2) < 2:
            return args      # one layer's errors on an exact input: the interval is already the exact range
        breaks = self._breakpoints(node)
        if not breaks:
            return args
        mask = self._unstable(v, breaks)
        if not bool(mask.any()):
            return args
        mask = self._most_unstable(v, mask)
        lo, hi = self._tighten(src, v, mask)
        nv = V(v.a, lo, hi)
        self.env[src] = nv
        return (nv,) + tuple(args[1:])

    def _refined_maxpool(self, node: fx.Node, rule):
        """For MaxPool1d/2d: the rule with the differences ``v_i - v_j*`` bounded by backward passes."""
        if node.op != "call_module":
            return rule
        m = self.q.get_submodule(node.target)
        if not isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) or getattr(m, "return_indices", False):
            return rule
        windows = _pool_windows(m, 1 if isinstance(m, nn.MaxPool1d) else 2)
        src = node.args[0]
        if windows is None or not isinstance(src, fx.Node) or src is self.input_node:
            return rule
        if self.sources.get(src, 2) < 1:
            return rule

        def diff_bounds(index, jx, cand):
            return self._diff_bounds(src, index, jx, cand)
        return lambda x: maxpool(lambda t: m(t), x, windows, diff_bounds)

    def _diff_bounds(self, src: fx.Node, index: torch.Tensor, jx: torch.Tensor, cand: torch.Tensor):
        """Bounds ``(lower, upper)`` of ``d_i - d_j`` (flat element indices ``index``, ``jx`` of ``src``)
        where ``cand`` (infinite elsewhere): two backward objectives per candidate pair, padded per
        input as in :meth:`_tighten`."""
        v = self.env[src]
        n = v.a.shape[0]
        m = int(v.a[0].numel())
        flat = cand.reshape(n, -1)
        counts = flat.sum(1)
        kmax = int(counts.max())
        order = flat.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :kmax]
        valid = torch.arange(kmax, device=flat.device)[None, :] < counts[:, None]
        ii = index.reshape(n, -1).gather(1, order).clamp_min(0)         # -1 (padding) is never a candidate
        jj = jx.reshape(n, -1).gather(1, order).clamp_min(0)
        hi = torch.full(flat.shape, torch.inf, dtype=v.a.dtype, device=v.a.device)
        lo = -hi.clone()
        per = max(1, CHUNK_ELEMENTS // (2 * n * max(self.widest, m)))
        for k0 in range(0, kmax, per):
            sl = slice(k0, k0 + per)
            ok = valid[:, sl].t()                                                            # [k, N]
            k = ok.shape[0]
            lam = torch.zeros(k, n, m, dtype=v.a.dtype, device=v.a.device)
            lam.scatter_add_(2, ii[:, sl].t().unsqueeze(-1), ok.to(v.a.dtype).unsqueeze(-1))
            lam.scatter_add_(2, jj[:, sl].t().unsqueeze(-1), -ok.to(v.a.dtype).unsqueeze(-1))
            tot = self.backward_from(src, torch.cat([lam, -lam]).reshape(2 * k, n, *v.a.shape[1:]))
            inf = torch.full_like(tot[:k], torch.inf)
            hi.scatter_reduce_(1, order[:, sl], torch.where(ok, tot[:k], inf).t(), reduce="amin")
            lo.scatter_reduce_(1, order[:, sl], torch.where(ok, -tot[k:], -inf).t(), reduce="amax")
        self.refined += int(counts.sum())
        return lo.reshape(cand.shape), hi.reshape(cand.shape)

    def _most_unstable(self, v: V, mask: torch.Tensor) -> torch.Tensor:
        """At most ``self.refine`` elements per input: those whose relaxation is loosest, by the
        triangle's height ``-l h / (h - l)`` of the interval ``[l, h]`` around its midpoint."""
        n = mask.shape[0]
        flat = mask.reshape(n, -1)
        if int(flat.sum(1).max()) <= self.refine:
            return mask
        l, h = v.l().reshape(n, -1), v.h().reshape(n, -1)
        r = (h - l) / 2
        off = (v.a.reshape(n, -1) + (l + h) / 2).abs()
        score = torch.where(flat, (r * r - off * off).clamp_min(0) / (2 * r).clamp_min(1e-300), -torch.ones_like(r))
        keep = torch.zeros_like(flat)
        keep.scatter_(1, score.topk(self.refine, dim=1).indices, True)
        return (keep & flat).reshape(mask.shape)

    def _tighten(self, src: fx.Node, v: V, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward bounds (both ends) for the elements in ``mask``, per input, padded to the largest count."""
        n = v.a.shape[0]
        flat = mask.reshape(n, -1)
        m = flat.shape[1]
        counts = flat.sum(1)
        kmax = int(counts.max())
        idx = flat.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :kmax]     # [N, kmax]
        valid = torch.arange(kmax, device=flat.device)[None, :] < counts[:, None]
        lo, hi = v.l().reshape(n, -1).clone(), v.h().reshape(n, -1).clone()
        per = max(1, CHUNK_ELEMENTS // (2 * n * max(self.widest, m)))
        for k0 in range(0, kmax, per):
            ix, ok = idx[:, k0:k0 + per].t(), valid[:, k0:k0 + per].t()                     # [k, N]
            k = ix.shape[0]
            lam = torch.zeros(k, n, m, dtype=v.a.dtype, device=v.a.device)
            lam.scatter_(2, ix.unsqueeze(-1), ok.unsqueeze(-1).to(v.a.dtype))
            tot = self.backward_from(src, torch.cat([lam, -lam]).reshape(2 * k, n, *v.a.shape[1:]))
            inf = torch.full_like(tot[:k], torch.inf)
            up, low = torch.where(ok, tot[:k], inf).t(), torch.where(ok, -tot[k:], -inf).t()    # [N, k]
            hi.scatter_reduce_(1, ix.t(), up, reduce="amin")
            lo.scatter_reduce_(1, ix.t(), low, reduce="amax")
        self.refined += int(counts.sum())
        lo, hi = lo.reshape(v.a.shape), hi.reshape(v.a.shape)
        return torch.minimum(lo, hi), torch.maximum(lo, hi)
