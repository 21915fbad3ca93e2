"""Mixed precision over whole weight grids, under a budget of stored bits per weight (scales included).

:mod:`.mixed` chooses a bit width per layer and does not count scales. Here each layer chooses one
of several *candidate specs* (e.g. int4 in groups of 128 with zero points, int8 per channel), and
the budget counts what a deployment stores: for a weight of ``n`` elements quantized with spec
``c`` (:func:`storage_bits`)::

    bits(c) = n * code_bits(c) + scales(c) * (scale_bits + zero_bits(c))

with ``scales(c)`` the number of scales the granularity gives, ``scale_bits`` 16 (a float16 scale,
as GGUF and GPTQ checkpoints store it; lowbit's own QTensor can store float16 scales too) and
``zero_bits`` 8 for an asymmetric integer grid (lowbit stores a zero point in one byte), 0 for a
symmetric one. The allocation is the multiple-choice knapsack of :mod:`.mixed` with these sizes::

    minimise  sum_l S_l(c_l)   subject to   sum_l bits_l(c_l) <= B * sum_l n_l

where ``S_l(c)`` is the output divergence with only layer ``l``'s weight quantized with ``c``
(round to nearest with the layer's range method; every other layer float), measured by a
:class:`~lowbit.analysis.probe.Probe` -- the HAWQ-style "quantize one layer, measure the output
change" sensitivity (Dong et al., ICCV 2019; the budgeted choice as in HAWQ-V3, Yao et al., ICML 2021).
For an embedding model the divergence is ``1 - cosine`` of the outputs; it adds up over layers to
second order, so the sum predicts the whole model's divergence and the knapsack spends the extra
bits where they remove most of it.

:func:`mixed_precision` measures, allocates and re-specs the layers of an unfrozen quantized model
in place; data-aware weight algorithms (GPTQ) run afterwards on each layer's own grid. It is the
``"mixed_precision"`` recipe step (:mod:`lowbit.recipes`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import ops
from ..modules import QuantLayer, WeightQuantizer
from ..quantize import quant_layers
from ..spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from .batches import as_batch_list
from .divergence import divergence
from .mixed import _pareto, _thin
from .probe import Probe
from .sensitivity import choose_metric

__all__ = ["storage_bits", "bits_per_weight", "model_bits_per_weight", "SpecAllocation", "spec_sensitivity", "allocate_specs",
           "mixed_precision"]

log = logging.getLogger(__name__)

SCALE_BITS = 16


def _scale_count(spec: QuantSpec, shape: Sequence[int]) -> int:
    g = spec.granularity
    if isinstance(g, PerTensor):
        return 1
    if isinstance(g, (PerChannel, PerGroup, PerToken)):
        return math.prod(g.param_shape(torch.Size(shape)))
    raise TypeError(f"unknown granularity {type(g).__name__}")


# formats whose scales are free floats (stored at ``scale_bits``); the others encode their own
# scales (MX: E8M0 per 32; NVFP4: E4M3 per 16 and a float32 per tensor; NF4 with double quantization)
_FREE_SCALES = ("int", "fp8_e4m3", "fp8_e5m2", "nf4")


def storage_bits(spec: QuantSpec, shape: Sequence[int], scale_bits: int = SCALE_BITS) -> int:
    """Bits to store a weight of ``shape`` (its GEMM view) with ``spec``: codes + scales + zero points."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a lowbit.QuantSpec, got {type(spec).__name__}")
    n = math.prod(shape)
    fmt = getattr(spec, "format", "int")
    if fmt not in _FREE_SCALES:
        return round(spec.number_format.bits_per_weight(spec, n) * n)
    zero_bits = 0 if spec.symmetric else 8
    return n * spec.bits + _scale_count(spec, shape) * (scale_bits + zero_bits)


def model_bits_per_weight(q: nn.Module, scale_bits: int = SCALE_BITS) -> float:
    """Stored bits per weight over the quantized layers of ``q`` (:func:`storage_bits` of each, summed)."""
    layers = [layer for _, layer in quant_layers(q) if isinstance(layer, QuantLayer)]
    if not layers:
        raise ValueError("q has no quantized layer; pass a model from lb.quantize")
    total = n = 0
    for layer in layers:
        shape = tuple(layer._weight_shape)
        gemm = (shape[0], math.prod(shape[1:]))
        total += storage_bits(layer.weight_quant.spec, gemm, scale_bits)
        n += math.prod(gemm)
    return total / n


def bits_per_weight(spec: QuantSpec, shape: Sequence[int], scale_bits: int = SCALE_BITS) -> float:
    """:func:`storage_bits` per element."""
    return storage_bits(spec, shape, scale_bits) / max(math.prod(shape), 1)


@dataclass
class SpecAllocation:
    """The spec chosen per layer, the bits per weight it costs (scales included) and the predicted divergence."""

    specs: dict[str, QuantSpec]
    choice: dict[str, int]
    bits_per_weight: float
    budget: float
    predicted: float
    exact: bool
    sensitivities: dict[str, dict[int, float]] = field(default_factory=dict)
    metric: str = "cosine"

    def as_dict(self) -> dict:
        return {"choice": dict(self.choice), "specs": {n: repr(s) for n, s in self.specs.items()},
                "bits_per_weight": self.bits_per_weight, "budget": self.budget, "predicted": self.predicted,
                "exact": self.exact, "metric": self.metric,
                "sensitivities": {n: dict(v) for n, v in self.sensitivities.items()}}


def _check_candidates(candidates) -> list[QuantSpec]:
    if isinstance(candidates, QuantSpec) or not isinstance(candidates, (list, tuple)) or len(candidates) < 2:
        raise ValueError("candidates must be a list of at least two QuantSpecs (e.g. int4 per group and int8 "
                         "per channel)")
    for c in candidates:
        if not isinstance(c, QuantSpec):
            raise TypeError(f"candidates must hold lowbit.QuantSpec, got {type(c).__name__}")
        if c.dynamic or isinstance(c.granularity, PerToken):
            raise ValueError(f"candidate {c} is an activation spec; weights need a static PerTensor/PerChannel/"
                             "PerGroup spec")
    return list(candidates)


def _at_spec(layer: QuantLayer, w_float: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    wq: WeightQuantizer = layer.weight_quant
    gemm = WeightQuantizer.gemm_view(w_float)
    with torch.no_grad():
        scale, zero_point = ops.choose_qparams(gemm, spec, wq.observer, **wq.observer_options)
        return ops.fake_quantize(gemm, spec.replace(rounding="nearest"), scale, zero_point).reshape(w_float.shape)


def spec_sensitivity(q: nn.Module, batches: Iterable, candidates: Sequence[QuantSpec], *,
                     float_model: nn.Module | None = None, metric: str = "auto") -> tuple[dict, str]:
    """``({layer: {i: divergence with only this layer's weight at candidates[i]}}, metric)``.

    ``q`` is an unfrozen quantized model (``float_model`` may then be None; see :class:`Probe`).
    Inputs stay float; ``metric``: ``"kl"``, ``"mse"``, ``"cosine"`` or ``"auto"`` (cosine for vectors).
    """
    candidates = _check_candidates(candidates)
    batches = as_batch_list(batches)
    probe = Probe(float_model, q)
    probe.configure()
    ref = probe.outputs(batches)
    metric = choose_metric(metric, False, ref)
    out: dict[str, dict[int, float]] = {}
    for name in probe.names:
        out[name] = {}
        for i, spec in enumerate(candidates):
            probe.configure({name: _at_spec(probe.layers[name], probe.w_float[name], spec)})
            out[name][i] = float(divergence(ref, probe.outputs(batches), metric).mean())
    probe.configure()
    return out, metric


def allocate_specs(sensitivities: dict[str, dict[int, float]], costs: dict[str, dict[int, float]],
                   budget_bits: float, max_states: int = 20000) -> tuple[dict[str, int], float, float, bool]:
    """``(choice, total bits, predicted divergence, exact)``: minimise ``sum S_l(c_l)`` with ``sum costs`` <= budget.

    The exact Pareto dynamic program of :func:`lowbit.analysis.mixed.allocate_bits`, with per-layer costs.
    """
    names = list(sensitivities)
    floor = sum(min(costs[n].values()) for n in names)
    if floor > budget_bits + 1e-6:
        raise ValueError(f"the budget is below the smallest possible size ({floor:.0f} bits with the cheapest "
                         "candidate everywhere); raise the budget")
    states: list = [(0.0, 0.0, ())]
    exact = True
    for n in names:
        grown = [(c + costs[n][i], v + s, ch + (i,)) for c, v, ch in states
                 for i, s in sensitivities[n].items() if c + costs[n][i] <= budget_bits + 1e-6]
        states = _pareto(grown)
        if len(states) > max_states:
            states = _thin(states, max_states, budget_bits)
            exact = False
    total, value, choice = min(states, key=lambda s: (s[1], s[0]))
    return dict(zip(names, choice)), total, value, exact


def mixed_precision(q: nn.Module, batches: Iterable, candidates: Sequence[QuantSpec], budget: float, *,
                    metric: str = "auto", scale_bits: int = SCALE_BITS, max_batches: int | None = 4,
                    float_model: nn.Module | None = None) -> SpecAllocation:
    """Give each quantized layer of ``q`` one of ``candidates`` within ``budget`` stored bits per weight (in place).

    Args:
        q: from ``lb.quantize`` (weight-only or not), not frozen, no grid pinned yet (run GPTQ after).
        batches: model inputs to measure the sensitivities on (``max_batches`` of them evenly spread; None: all).
        candidates: weight specs to choose from; each layer keeps its range method (observer).
        budget: average stored bits per weight over the quantized layers, scales included
            (:func:`bits_per_weight`); e.g. 4.5.
        scale_bits: bits of one stored scale (16: float16).

    Returns the :class:`SpecAllocation` (also kept as ``q.lowbit_mixed``). On error ``q`` is unchanged.
    """
    candidates = _check_candidates(candidates)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"budget must be a positive number of bits per weight, got {budget!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be an int >= 1 or None, got {max_batches!r}")
    layers = dict(quant_layers(q))
    frozen = [n for n, layer in layers.items() if layer.frozen or layer.weight_quant.fixed]
    if frozen:
        raise ValueError(f"layers {frozen[:3]} are frozen or pinned; run mixed_precision before GPTQ and lb.freeze")
    batches = as_batch_list(batches)
    if max_batches is not None and len(batches) > max_batches:     # evenly spread (batches may be sorted by length)
        batches = [batches[(i * len(batches)) // max_batches] for i in range(max_batches)]
    shapes = {n: tuple(WeightQuantizer.gemm_view(layer.weight).shape) for n, layer in layers.items()}
    costs = {n: {i: float(storage_bits(c, shapes[n], scale_bits)) for i, c in enumerate(candidates)}
             for n in layers}
    total_weights = sum(math.prod(s) for s in shapes.values())
    sens, metric = spec_sensitivity(q, batches, candidates, float_model=float_model, metric=metric)
    choice, bits, predicted, exact = allocate_specs(sens, costs, budget * total_weights)
    for name, i in choice.items():
        old = layers[name].weight_quant
        layers[name].weight_quant = WeightQuantizer(candidates[i], old.observer, old.observer_options, old.ste)
    alloc = SpecAllocation(specs={n: candidates[i] for n, i in choice.items()}, choice=choice,
                           bits_per_weight=bits / total_weights, budget=float(budget), predicted=predicted,
                           exact=exact, sensitivities=sens, metric=metric)
    q.lowbit_mixed = alloc
    log.info("mixed precision: %.3f bits per weight (budget %.3f); %s", alloc.bits_per_weight, budget,
             {i: sum(1 for c in choice.values() if c == i) for i in range(len(candidates))})
    return alloc
