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

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .batches import output_tensor
from .bound_rules import ROUNDING
from .bound_walk import CHUNK_ELEMENTS, Tracer, Walk
from .probe import weight_pairs

__all__ = ["BoundResult", "logit_bound"]

MAX_BACKWARD_OUTPUTS = 64      # logits per input the backward pass bounds (2 objectives each)
WALK_INPUTS = 200              # inputs per walk with the backward pass


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


def _chunks(q: nn.Module, graph: fx.Graph, pairs: dict, x: torch.Tensor, per: int, rounding: str,
            refine) -> object:
    """``(walk, output V)`` per chunk of ``per`` inputs; ``refine()`` says whether to refine this chunk."""
    for i in range(0, x.shape[0], per):
        walk = Walk(q, graph, pairs, x[i:i + per], rounding, refine())
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
        backward: also run the backward (linear-relaxation) pass, with the intermediate bounds of
            unstable neurons refined by backward passes (True or ``"auto"``, the default), or not
            (False: the interval bound only).
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
            graph = Tracer().trace(q)
        except Exception as e:  # noqa: BLE001 - any tracing failure means "unsupported", named
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            unsupported.append(f"{type(q).__name__}: torch.fx cannot trace it ({first}); models with "
                               "data-dependent control flow are not supported")
            graph = None
        if graph is not None:
            use_backward = backward is True or backward == "auto"
            per = _chunk_size(z_float, x, use_backward)
            for i, (walk, out) in enumerate(_chunks(q, graph, pairs, x, per, rounding, lambda: use_backward)):
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
    """Inputs per walk: all for the interval pass; for the backward pass few enough that the walk's
    tensors stay small and the objectives of one backward pass fit :data:`CHUNK_ELEMENTS`."""
    n = x.shape[0]
    if not backward:
        return n
    k = 2 * max(1, z[0].numel())
    width = max(1, x[0].numel()) * 64     # a generous guess of the widest activation per input
    return max(1, min(n, WALK_INPUTS, CHUNK_ELEMENTS // (k * width)))
