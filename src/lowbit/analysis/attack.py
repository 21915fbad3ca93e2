"""Adversarial roundings: a search for the rounding that moves a logit difference the most.

Under worst-case rounding (:func:`.certify.certify`, ``rounding="worst"``) every activation
quantizer may return any value within half a step of its input, clipping at the grid's ends
exact::

    Q(v) = clamp(v + e, bot, top),    |e| <= s / 2            (one e per activation element)

The search maximises the drop of the quantized margin ``min_k (z_q,t - z_q,k)`` (``t`` the float
model's top-1 class) over the ``e`` by projected sign-gradient steps (PGD: Madry et al., "Towards
Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018), starting from the first-order
worst case (the sign of the gradient at ``q``'s own rounding; the gradient is passed through the
clip, so an input at a grid's end can still be pushed back inside). Every rounding it tries is
admissible, so

* an input whose margin it drives to ``<= 0`` is *falsified*: no sound certificate can certify it,
  and the fraction it leaves is an upper limit on any certified fraction (the first-order limit of
  :mod:`.limit` is an estimate, this one is a bound);
* the change it finds lies inside every sound bound: a test oracle stronger than random roundings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules import ActQuantizer
from ..ops.params import broadcast_param
from .batches import output_tensor

__all__ = ["RoundingAttack", "rounding_attack"]


@dataclass
class RoundingAttack:
    """``worst`` ``[N, C]``: the smallest ``z_q,t - z_q,k`` found (``+inf`` at ``k = t``);
    ``falsified`` ``[N]``: some ``k`` with ``worst <= 0``; ``top`` ``[N]`` the float top-1 class."""

    worst: torch.Tensor
    falsified: torch.Tensor
    top: torch.Tensor

    @property
    def ceiling(self) -> float:
        """The fraction of inputs not falsified: no sound certificate certifies more."""
        return float((~self.falsified).double().mean()) if self.falsified.numel() else 0.0


def _quantizers(q: nn.Module) -> list[ActQuantizer]:
    return [m for m in q.modules() if isinstance(m, ActQuantizer) and m.enabled and m.scale is not None
            and not m.spec.dynamic and not m.observing]


def rounding_attack(q: nn.Module, x: torch.Tensor, top: torch.Tensor, steps: int = 30,
                    chunk: int = 500) -> RoundingAttack:
    """Search admissible roundings of ``q``'s static activation quantizers that flip ``top``.

    Args:
        q: the quantized model; x: a batch ``[N, ...]``; top: ``[N]`` the float model's classes.
        steps: sign-gradient steps (each one forward and one backward pass of ``q``); the step
            size shrinks from half the half-step to a twentieth of it.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    quantizers = _quantizers(q)
    was = q.training
    q.eval()
    try:
        worst = torch.cat([_chunk(q, quantizers, x[i:i + chunk], top[i:i + chunk], steps)
                           for i in range(0, x.shape[0], chunk)])
    finally:
        q.train(was)
    return RoundingAttack(worst=worst, falsified=(worst <= 0).any(1), top=top)


def _chunk(q: nn.Module, quantizers: list, x: torch.Tensor, top: torch.Tensor, steps: int) -> torch.Tensor:
    errs: list[torch.Tensor] = []
    halves: list[torch.Tensor] = []
    calls = [0]

    def hook(mod, args, out):
        v = args[0]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or out.shape != v.shape:
            return out
        spec = mod.active_spec()
        s = broadcast_param(mod.scale.to(v.dtype), v.shape, spec)
        z = broadcast_param(mod.zero_point.to(v.dtype), v.shape, spec)
        i = calls[0]
        calls[0] += 1
        if i == len(errs):
            errs.append(torch.zeros_like(v, requires_grad=True))
            halves.append((s / 2 + torch.zeros_like(v)).detach())
        moved = v + errs[i]
        clipped = torch.minimum(torch.maximum(moved, (spec.qmin - z) * s), (spec.qmax - z) * s)
        return moved + (clipped - moved).detach()   # the clipped value; its gradient passes the clip

    handles = [m.register_forward_hook(hook) for m in quantizers]
    best = None
    try:
        with torch.enable_grad():
            for step in range(steps + 1):
                calls[0] = 0
                z = output_tensor(q(x))
                diff = (z.gather(1, top.reshape(-1, 1)) - z).double().scatter(1, top.reshape(-1, 1), torch.inf)
                best = diff.detach() if best is None else torch.minimum(best, diff.detach())
                if step == steps or not errs:
                    break
                grads = torch.autograd.grad(diff.amin(1).sum(), errs)
                rate = 1.0 if step == 0 else 0.5 * (0.1 ** ((step - 1) / max(1, steps - 1)))
                with torch.no_grad():
                    for e, g, h in zip(errs, grads, halves):
                        e.sub_(rate * h * g.sign())
                        e.copy_(torch.minimum(torch.maximum(e, -h), h))
    finally:
        for hd in handles:
            hd.remove()
    return best
