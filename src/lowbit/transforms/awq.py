"""AWQ: activation-aware weight scaling, so the few weights that meet large activations round better.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han 2024, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration" (MLSys). A linear layer ``y = W x`` is unchanged
by a per-input-channel factor ``s > 0``::

    W x = (W diag(s)) (diag(s)^-1 x)

but its weight-only quantization is not: ``Q(W diag(s)) diag(s)^-1`` scales the rounding error of
column ``j`` by ``1/s_j`` (as long as the group's range, and so its step, barely moves), so channels
that carry large activations ``|x_j|`` should get ``s_j > 1``. AWQ takes

    s_j = mean|x_j|^alpha / sqrt(max_k mean|x_k|^alpha * min_k mean|x_k|^alpha)     (alpha in [0, 1])

(``mean`` over all calibration tokens; the normalisation centres ``s`` around 1 on a log scale)
and picks ``alpha`` on a grid ``{0, 1/n, ..., (n-1)/n}`` to minimise the layer's calibration output
error of round to nearest on the weight grid ``spec``::

    E(alpha) = sum_x ||W x - Q(W diag(s)) diag(s)^-1 x||^2 = tr(dW H dW^T),
    dW = W - Q(W diag(s)) diag(s)^-1,   H = sum_x x x^T

``H`` is accumulated once per layer (one pass over the calibration batches), so the search costs
one fake quantization and one ``[rows, d] x [d, d]`` product per grid point, not a forward pass.
``alpha = 0`` (``s = 1``, plain round to nearest) is always on the grid, so AWQ never has a larger
calibration error than round to nearest on the same grid. Layers reading the same tensor that
is folded (below) share one ``s``: ``alpha`` minimises the sum of their errors.

Where ``diag(s)^-1 x`` is computed is SmoothQuant's choice (:mod:`lowbit.transforms.smooth_quant`):
folded into a LayerNorm/RMSNorm read only by linear layers (pre-LN transformers), else an explicit
:class:`~lowbit.transforms.smooth_quant.SmoothedLinear` (``explicit=True``; post-LN BERT / MiniLM,
FFN down-projections, attention output projections). The result is a float model computing the
same function (to float rounding); ``lb.quantize`` with the same weight spec then quantizes the
scaled weights, and GPTQ (``lb.gptq``) can run on top (Frantar et al. 2022; the two are
complementary: AWQ picks the scale of the columns, GPTQ the rounding).
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import batches as _batches
from .. import ops
from ..modules import QuantLayer
from ..spec import PerToken, QuantSpec
from .dataflow import trace_linear_inputs
from .pipeline import register_transform
from ..modules.tree import set_module
from ..modules import float_gemm_weight
from .dataflow import linear_layers
from .smooth_quant import (SmoothedLinear, _patterns, check_norm_fold, fold_into_norm, foldable_norm, norm_probe,
                           tied_layers)
from .verify import check_preserved

__all__ = ["awq", "awq_factors", "layer_error", "AWQInfo", "AWQLayer"]

log = logging.getLogger(__name__)


@dataclass
class AWQLayer:
    """One layer: how its factor is applied (``"folded into <norm>"`` / ``"explicit"``), the chosen
    ``alpha``, and its calibration output error per input vector under round to nearest on the weight
    grid without (``rtn_error``) and with (``awq_error``) the factor."""

    how: str
    alpha: float
    rtn_error: float
    awq_error: float

    @property
    def gain(self) -> float:
        return self.rtn_error / self.awq_error if self.awq_error > 0 else float("inf")


@dataclass
class AWQInfo:
    """What :func:`awq` did (``model.lowbit_awq``)."""

    weights: QuantSpec
    grid: int
    layers: dict[str, AWQLayer] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"weights": str(self.weights), "grid": self.grid, "skipped": dict(self.skipped),
                "layers": {n: vars(v).copy() for n, v in self.layers.items()}}


class _Stats:
    """Per linear layer: ``H = sum x x^T`` (if ``with_h``), ``sum |x|`` (float32) and the number of
    input vectors."""

    def __init__(self, with_h: bool = True) -> None:
        self.with_h = with_h
        self.h: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        with torch._C.DisableTorchFunction():   # invisible to the dataflow tracer (not a reader of x)
            self._add(x)

    def _add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.numel() == 0:
            return
        x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
        if self.with_h:
            xtx = x.T @ x
            self.h = xtx if self.h is None else self.h.add_(xtx)
        a = x.abs().sum(0)
        self.abs_sum = a if self.abs_sum is None else self.abs_sum.add_(a)
        self.n += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)


def awq_factors(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = m^alpha / sqrt(max(m^alpha) min(m^alpha))`` for per-channel ``m = mean|x_j|`` (float32).

    Channels with ``m_j = 0`` (never active in calibration) count as the smallest active one.
    """
    m = mean_abs.float()
    pos = m[m > 0]
    floor = float(pos.min()) if pos.numel() else 1.0
    s = m.clamp_min(floor).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor, n: int) -> float:
    """Mean squared output error per input vector, ``tr((W - W^) H (W - W^)^T) / n``."""
    dw = (w - w_hat).to(h.dtype)
    return float(((dw @ h) * dw).sum(dtype=torch.float64)) / max(n, 1)


def _rtn(w: torch.Tensor, spec: QuantSpec, observer: str, options: dict) -> torch.Tensor:
    scale, zero_point = ops.choose_qparams(w, spec, observer, **options)
    return ops.fake_quantize(w, spec, scale, zero_point)


def _search(weights: list[torch.Tensor], stats: _Stats, spec: QuantSpec, observer: str, options: dict,
            grid: int) -> tuple[float, torch.Tensor, float, float]:
    """``(alpha, s, rtn_error, best_error)`` for layers sharing one input (errors summed)."""
    h = stats.h
    ws = [w.detach().float() for w in weights]
    m = stats.mean_abs.to(h.device)
    best = None
    rtn = 0.0
    for i in range(grid):
        alpha = i / grid
        s = awq_factors(m, alpha)
        err = 0.0
        for w in ws:
            w_hat = _rtn(w * s, spec, observer, options) / s
            err += layer_error(w, w_hat, h, stats.n)
        if i == 0:
            rtn = err
        if best is None or err < best[2]:
            best = (alpha, s, err)
    return best[0], best[1], rtn, best[2]


def _check(model, weights, grid, observer, explicit, stats_budget=None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("awq acts on the float model: apply it before lb.quantize (recipes do: "
                         "transforms=(('awq', {'weights': spec}),))")
    if not isinstance(weights, QuantSpec):
        raise TypeError(f"weights must be the lowbit.QuantSpec the weights will be quantized with (AWQ searches "
                        f"its factors on that grid), got {type(weights).__name__}")
    if weights.dynamic or isinstance(weights.granularity, PerToken):
        raise ValueError(f"weights must be a static weight spec (PerTensor, PerChannel(0) or PerGroup), got {weights}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be an int >= 1 (alpha is searched over i/grid, i < grid; AWQ uses 20), "
                         f"got {grid!r}")
    if observer not in ops.RANGE_METHODS:
        raise ValueError(f"observer must be one of {sorted(ops.RANGE_METHODS)} (the weight range method of "
                         f"lb.quantize), got {observer!r}")
    if not isinstance(explicit, bool):
        raise TypeError(f"explicit must be a bool, got {explicit!r}")
    if stats_budget is not None and (isinstance(stats_budget, bool) or not isinstance(stats_budget, int)
                                     or stats_budget < 0):
        raise ValueError(f"stats_budget must be None or an int >= 0 (bytes of statistics held at a time, "
                         f"e.g. 1 << 28), got {stats_budget!r}")


@contextlib.contextmanager
def _hooked(modules: dict, stats: dict):
    """Forward pre-hooks feeding each named layer's input to its :class:`_Stats`."""
    hooks = [modules[n].register_forward_pre_hook(lambda _m, args, st=st: st.add(args[0]) if args else None)
             for n, st in stats.items()]
    try:
        yield
    finally:
        for hk in hooks:
            hk.remove()


def _passes(units, stats, budget):
    """Split the search units into calibration passes whose Hessians (``d^2`` float32 each) fit in
    ``budget`` bytes (at least one unit per pass; ``None``: all in one pass)."""
    batch, used = [], 0
    for unit in units:
        d = stats[unit[1][0]].abs_sum.numel()
        size = 4 * d * d
        if batch and budget is not None and used + size > budget:
            yield batch
            batch, used = [], 0
        batch.append(unit)
        used += size
    if batch:
        yield batch


@torch.inference_mode(False)   # what it builds stays ordinary tensors when called inside inference_mode
def awq(model: nn.Module, batches: Iterable, weights: QuantSpec, *, grid: int = 20, observer: str = "minmax",
        observer_options: dict | None = None, explicit: bool = True,
        include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
        stats_budget: int | None = 1 << 28) -> nn.Module:
    """An AWQ-scaled copy of the float ``model`` for weights quantized with ``weights`` (see the module docstring).

    Args:
        batches: calibration inputs (see :mod:`lowbit.batches`), run once.
        weights: the weight grid the model will be quantized with (``lb.quantize(weights=...)``).
        grid: number of ``alpha`` values searched, ``i / grid`` for ``i < grid``.
        observer / observer_options: the weight range method (``weight_observer`` of ``lb.quantize``).
        explicit: scale layers whose input cannot be folded into a norm with an explicit
            :class:`~lowbit.transforms.smooth_quant.SmoothedLinear` (True), or leave them alone (False).
        include / exclude: glob patterns over ``nn.Linear`` names selecting the layers to scale.
        stats_budget: bytes of input statistics (``H``, ``d x d`` float32 per searched input) held
            at a time: the units are searched in calibration passes whose ``H`` fit (256 MiB by
            default; ``0``: one input at a time, one pass each; ``None``: all in one pass). Layers
            reading the same input share one ``H``. The result does not depend on it.

    The copy computes the same function as ``model`` and carries ``lowbit_awq`` (an :class:`AWQInfo`).
    """
    _check(model, weights, grid, observer, explicit, stats_budget)
    spec = weights.replace(rounding="nearest")
    options = dict(observer_options or {})
    data = _batches.as_batches(batches)
    out = copy.deepcopy(model)
    linear_names = [n for n, _ in linear_layers(out)]
    if not linear_names:
        raise ValueError("awq: model has no nn.Linear (or transformers Conv1D) layer to scale")
    include = _patterns("include", include, linear_names)
    exclude = _patterns("exclude", exclude, linear_names)
    modules = dict(out.named_modules())
    stats = {n: _Stats(with_h=False) for n in linear_names}      # mean |x| only: d floats per layer
    device = _batches.model_device(out)
    call = lambda m, b: _batches.call(m, b, device)   # noqa: E731
    with _hooked(modules, stats):
        flow = trace_linear_inputs(out, data, call)

    info = AWQInfo(weights=weights, grid=grid)
    selected = []
    tied = tied_layers(out, linear_names)
    for name in linear_names:
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if name in tied:
            info.skipped[name] = tied[name]
            continue
        if stats[name].n == 0:
            info.skipped[name] = "no calibration batch reached it"
            continue
        selected.append(name)

    # the search units: a norm's readers sharing one folded factor, or one layer with an explicit one
    readers = flow.readers()
    units: list[tuple[str | None, list[str]]] = []
    folded: set[str] = set()
    for norm_name, group in readers.items():
        if not flow.foldable(norm_name, group) or not all(n in selected for n in group):
            continue
        offset, why_not = foldable_norm(modules, norm_name)
        if offset is None:
            log.info("awq: not folding into %s: %s", norm_name, why_not)
            continue
        units.append((norm_name, list(group)))
        folded.update(group)
    for name in selected:
        if name in folded:
            continue
        if not explicit:
            info.skipped[name] = "its input is not a norm output read only by linear layers; explicit=False"
            continue
        units.append((None, [name]))

    # H = sum x x^T of each unit's input, for as many units as fit in stats_budget per pass; each
    # searched and freed before the next pass (the model is changed only after every search)
    found = {}
    was_training = out.training
    for batch_units in _passes(units, stats, stats_budget):
        h_stats = {group[0]: _Stats() for _, group in batch_units}
        out.eval()
        try:
            with _hooked(modules, h_stats), torch.no_grad():
                for b in data:
                    call(out, b)
        finally:
            out.train(was_training)
        for norm_name, group in batch_units:
            found[(norm_name, group[0])] = _search([float_gemm_weight(modules[n]) for n in group], h_stats[group[0]],
                                                   spec, observer, options, grid)
        del h_stats

    # 1. one shared factor, folded into a norm whose output only the selected linear layers read
    for norm_name, group in units:
        if norm_name is None:
            continue
        alpha, s, rtn, err = found.pop((norm_name, group[0]))
        offset, _ = foldable_norm(modules, norm_name)
        probe, before = norm_probe(modules[norm_name])
        fold_into_norm(modules[norm_name], s, [modules[n] for n in group], offset)
        check_norm_fold(norm_name, modules[norm_name], probe, before, s)
        for n in group:
            info.layers[n] = AWQLayer(f"folded into {norm_name}", alpha, rtn, err)

    # 2. the others: explicit factor
    for norm_name, (name,) in ((u, g) for u, g in units if u is None):
        lin = modules[name]
        g = float_gemm_weight(lin)
        alpha, s, rtn, err = found.pop((None, name))
        if alpha == 0.0:   # s = 1: nothing to gain, keep the plain layer
            info.layers[name] = AWQLayer("unchanged", alpha, rtn, err)
            continue
        with torch.no_grad():
            g.mul_(s.to(g))
        wrapped = SmoothedLinear(lin, s.to(g.device))
        if name:
            set_module(out, name, wrapped)
        else:          # the model is the linear layer itself
            out = wrapped
        info.layers[name] = AWQLayer("explicit", alpha, rtn, err)
    log.info("awq: %d linear layers scaled (%d folded), %d skipped", len(info.layers), len(folded), len(info.skipped))
    check_preserved(model, out, data[0], lambda m, b: _batches.call(m, b, device), "awq",
                    sorted(n for n, v in info.layers.items() if v.how != "unchanged"))
    out.lowbit_awq = info
    return out


register_transform("awq", "float", lambda m, batches, **o: awq(m, batches, **o))
