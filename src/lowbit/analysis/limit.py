"""The first-order worst-case limit: what any sound certificate under worst-case rounding can reach.

Linearise the quantized network ``q`` around its own computation and let every activation
rounding move adversarially within half a step (the weights are ``q``'s, exact). With ``e_j`` the
rounding error ``q`` made at activation element ``j`` (``Q(v_j) - v_j``), ``h_j = s_j / 2`` where
``v_j`` lies in the grid's range (0 where it is clipped: the code cannot move there) and
``J_kj = d(z_t - z_k) / d e_j`` (``t`` the float model's top-1 class), the first-order worst case of
the quantized logit difference is::

    D_k = (z_q,t - z_q,k) - sum_j J_kj e_j - sum_j |J_kj| h_j

An input is *certifiable to first order* when ``D_k > 0`` for every ``k != t``. A sound bound under
worst-case rounding cannot certify an input whose first-order worst case already flips (up to the
curvature neglected by the linearisation), so the fraction of such inputs is the ceiling a
certificate can be compared with. One forward pass with the roundings exposed as leaf tensors and
one vector-Jacobian product per class (Griewank and Walther, "Evaluating Derivatives", 2008).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules import ActQuantizer
from ..ops.params import broadcast_param
from .batches import output_tensor

__all__ = ["FirstOrderLimit", "first_order_limit"]


@dataclass
class FirstOrderLimit:
    """Per input: ``worst`` ``[N, C]`` the first-order worst case ``D_k`` of ``z_q,t - z_q,k``
    (``+inf`` at ``k = t``), ``change`` ``[N, C]`` the first-order worst change
    ``sum_j |J_kj| h_j``, ``certifiable`` ``[N]`` bool, and ``top`` ``[N]`` the float top-1 class."""

    worst: torch.Tensor
    change: torch.Tensor
    certifiable: torch.Tensor
    top: torch.Tensor

    @property
    def fraction(self) -> float:
        return float(self.certifiable.double().mean()) if self.certifiable.numel() else 0.0


def _grid(aq: ActQuantizer, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = aq.active_spec()
    s = broadcast_param(aq.scale.to(v.dtype), v.shape, spec)
    z = broadcast_param(aq.zero_point.to(v.dtype), v.shape, spec)
    return s, (spec.qmin - z) * s, (spec.qmax - z) * s


def first_order_limit(q: nn.Module, x: torch.Tensor, top: torch.Tensor, chunk: int = 1000) -> FirstOrderLimit:
    """The first-order worst case of every logit difference ``z_q,top - z_q,k`` of ``q`` at ``x``.

    Args:
        q: the quantized model (its static activation quantizers are the roundings; dynamic or
            uncalibrated ones are left as they are).
        x: a batch ``[N, ...]``; top: ``[N]`` the float model's predicted classes.
    """
    quantizers = [m for m in q.modules() if isinstance(m, ActQuantizer) and m.enabled and m.scale is not None
                  and not m.spec.dynamic and not m.observing]
    was = q.training
    q.eval()
    out_w, out_c = [], []
    try:
        for i in range(0, x.shape[0], chunk):
            w, c = _limit_chunk(q, quantizers, x[i:i + chunk], top[i:i + chunk])
            out_w.append(w)
            out_c.append(c)
    finally:
        q.train(was)
    worst, change = torch.cat(out_w), torch.cat(out_c)
    return FirstOrderLimit(worst=worst, change=change, certifiable=(worst > 0).all(1), top=top)


def _limit_chunk(q: nn.Module, quantizers: list, x: torch.Tensor, top: torch.Tensor):
    leaves: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []     # (e leaf, e0, h)

    def hook(mod, args, out):
        v = args[0]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or out.shape != v.shape:
            return out
        s, bot, top_ = _grid(mod, v.detach())
        vc = torch.minimum(torch.maximum(v, bot), top_)          # d Q / d v: 1 inside the range, 0 clipped
        e0 = (out - vc).detach()
        inside = (v.detach() >= bot) & (v.detach() <= top_)
        e = torch.zeros_like(v, requires_grad=True)
        leaves.append((e, e0, torch.where(inside, s / 2, torch.zeros_like(s))))
        return vc + e0 + e

    handles = [m.register_forward_hook(hook) for m in quantizers]
    try:
        with torch.enable_grad():
            z = output_tensor(q(x))
            n, c = z.shape[0], z.shape[1]
            zt = z.gather(1, top.reshape(-1, 1))
            diff = (zt - z).double()                               # z_t - z_k, [N, C]
            worst = diff.detach().clone()
            change = torch.zeros_like(worst)
            es = [e for e, _, _ in leaves]
            for k in range(c):
                if not es:
                    break
                grads = torch.autograd.grad(diff[:, k].sum(), es, retain_graph=k < c - 1, allow_unused=True)
                for g, (_, e0, h) in zip(grads, leaves):
                    if g is None:
                        continue
                    g = g.double().reshape(n, -1)
                    worst[:, k] -= (g * e0.double().reshape(n, -1)).sum(1)
                    ch = (g.abs() * h.double().reshape(n, -1)).sum(1)
                    worst[:, k] -= ch
                    change[:, k] += ch
    finally:
        for h in handles:
            h.remove()
    worst.scatter_(1, top.reshape(-1, 1), torch.inf)
    return worst.detach(), change.detach()
