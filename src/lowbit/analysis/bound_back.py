"""Backward maps of the certified bound: how a node's output error depends on its inputs' errors.

Each map turns a linear objective on a node's output error, ``sum(lam * d_out)`` (``lam`` of shape
``[K, N, *out]``: K objectives for each of N inputs), into one on its inputs' errors plus a
constant that bounds everything else from above::

    sum(lam * d_out)  <=  sum_i sum(lam_i * d_in_i)  +  c          (c of shape [K, N])

* :class:`Lin`: ``d_out = L(d_in) + const + eta``, ``|eta| <= slack``, ``L`` linear (layers,
  pooling, BatchNorm, reshapes, sums): ``lam_i = L^T lam`` (a vector-Jacobian product);
* :class:`Elementwise`: ``s_lo d + c_lo <= d_out <= s_up d + c_up``: the upper line where
  ``lam >= 0``, the lower one elsewhere (ReLU's triangle relaxation, quantizers);
* :class:`MaxPoolBack`: the max moves at least as its float argmax does, and exactly so where that
  argmax cannot change;
* :class:`WindowMaxBack`: the same lower line, and above ``max_i v_i <= v_j* + sum_i relu(v_i - v_j*)``
  with each ReLU's chord on the bounds of ``v_i - v_j*``: linear in the errors of the window;
* :class:`Cut`: ``|lam| E`` (concretize: no dependence passed on), always sound.

Zhang et al., "Efficient Neural Network Robustness Certification with General Activation
Functions" (CROWN), NeurIPS 2018.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["Back", "Cut", "Lin", "Elementwise", "Chain", "MaxPoolBack", "WindowMaxBack", "total", "dot"]


def total(t: torch.Tensor) -> torch.Tensor:
    """Sum over everything but the leading (objective, sample) dimensions."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


def dot(lam: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``total(lam * c)`` for ``c`` shaped like one objective's ``lam`` (``[N, *out]``), without the product tensor."""
    k, n = lam.shape[0], lam.shape[1]
    lam3 = lam.reshape(k, n, -1).transpose(0, 1)                    # [N, K, M]
    return torch.bmm(lam3, c.expand(lam.shape[1:]).reshape(n, -1, 1)).squeeze(-1).transpose(0, 1)


def _range(lam: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``total(max(lam * lo, lam * hi))`` = ``lam . mid + |lam| . rad``."""
    return dot(lam, (lo + hi) / 2) + dot(lam.abs(), (hi - lo) / 2)


class Back:
    """Base class; ``back(lam) -> (list of input lams, constant [K, N])``."""

    def back(self, lam: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        raise NotImplementedError


class Cut(Back):
    """``sum(lam * d) <= sum(max(lam * lo, lam * hi))`` for ``d`` in ``[lo, hi]``."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.lo, self.hi = lo, hi

    def back(self, lam):
        return [], _range(lam, self.lo, self.hi)


class Lin(Back):
    """``d_out = fn(d_1, ..., d_m) + const + eta``, ``|eta| <= slack``, ``fn`` linear (None: the identity)."""

    def __init__(self, fn: Callable | None, primals: list[torch.Tensor], const: torch.Tensor | None = None,
                 slack: torch.Tensor | None = None) -> None:
        self.fn, self.primals, self.const, self.slack = fn, primals, const, slack

    def back(self, lam):
        c = torch.zeros(lam.shape[:2], dtype=lam.dtype, device=lam.device)
        if self.const is not None:
            c = c + dot(lam, self.const)
        if self.slack is not None:
            c = c + dot(lam.abs(), self.slack)
        if self.fn is None:
            return [lam], c
        _, vjp = torch.func.vjp(self.fn, *self.primals)
        return list(torch.func.vmap(vjp)(lam)), c


class Elementwise(Back):
    """``s_lo d + c_lo <= d_out <= s_up d + c_up`` elementwise, plus ``|eta| <= slack``."""

    def __init__(self, s_lo, c_lo, s_up, c_up, slack: torch.Tensor | None = None) -> None:
        self.s_lo, self.s_up = s_lo, s_up
        self.ds = None if s_lo is s_up else s_up - s_lo
        # lam c_up where lam >= 0, lam c_lo elsewhere (each widened by the slack):
        # lam . (c_lo - slack) + max(lam, 0) . (c_up - c_lo + 2 slack)
        extra = slack if slack is not None else 0
        self.base = c_lo - extra
        self.width = (c_up - c_lo) + 2 * extra

    def back(self, lam):
        pos = lam.clamp_min(0)
        if self.ds is None:
            out = lam * self.s_up
        else:   # lam * s_up where lam >= 0, lam * s_lo elsewhere
            out = lam * self.s_lo + pos * self.ds
        return [out], dot(lam, self.base) + dot(pos, self.width)


class Chain(Back):
    """Single-input maps applied from the output side: ``Chain(outer, inner)``."""

    def __init__(self, *backs: Back) -> None:
        self.backs = backs

    def back(self, lam):
        c = torch.zeros(lam.shape[:2], dtype=lam.dtype, device=lam.device)
        for b in self.backs:
            lams, k = b.back(lam)
            c = c + k
            if not lams:
                return [], c
            lam = lams[0]
        return [lam], c


class MaxPoolBack(Back):
    """``max a^ - max a >= d_j*`` (``j*`` the argmax of ``a``); ``<= d_j*`` where ``j*`` stays the
    argmax for every value in the intervals (``stable``), else ``<= upper``."""

    def __init__(self, fn: Callable, a: torch.Tensor, stable: torch.Tensor, upper: torch.Tensor) -> None:
        self.fn, self.a, self.stable, self.upper = fn, a, stable, upper

    def back(self, lam):
        loose = lam.clamp_min(0) * ~self.stable          # the part of lam bounded by the constant
        c = dot(loose, self.upper)
        _, vjp = torch.func.vjp(self.fn, self.a)
        return list(torch.func.vmap(vjp)(lam - loose)), c


class WindowMaxBack(Back):
    """Max pooling ``o = max_i v_i`` over explicit windows, ``v = a + d``, ``j*`` the float argmax::

        d_o >= d_j*,      d_o <= d_j* + sum_{i != j*} (c_i (a_i - a_j* + d_i - d_j*) + b_i)

    from ``max_i v_i <= v_j* + sum_i relu(v_i - v_j*)`` and ``relu(u) <= c u + b`` on the bounds
    ``[l_i, h_i]`` of ``u_i = v_i - v_j*`` (``c = b = 0`` where ``h_i <= 0``: ``i`` cannot win).

    ``index``: ``[C, *out, k]`` flat input positions of each window (``-1``: padding); ``coef_up``
    / ``coef_lo``: ``[N, C, *out, k]`` the coefficients of the upper / lower line on the window's
    errors; ``const``: ``[N, C, *out]`` the upper line's constant; ``in_shape``: the input's shape.
    """

    def __init__(self, index: torch.Tensor, coef_up: torch.Tensor, coef_lo: torch.Tensor, const: torch.Tensor,
                 in_shape: tuple) -> None:
        self.index, self.coef_up, self.coef_lo, self.const, self.in_shape = index, coef_up, coef_lo, const, in_shape

    def back(self, lam):
        kk, n = lam.shape[0], lam.shape[1]
        pos = lam.clamp_min(0)
        vals = pos.unsqueeze(-1) * self.coef_up + (lam - pos).unsqueeze(-1) * self.coef_lo    # [K, N, C, *out, k]
        idx = self.index.clamp_min(0).reshape(1, 1, -1).expand(kk, n, -1)
        out = torch.zeros(kk, n, int(torch.Size(self.in_shape[1:]).numel()), dtype=lam.dtype, device=lam.device)
        out.scatter_add_(2, idx, vals.reshape(kk, n, -1))
        return [out.reshape(kk, n, *self.in_shape[1:])], dot(pos, self.const)
