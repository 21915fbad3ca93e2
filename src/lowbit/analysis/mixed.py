"""Mixed precision: choose a bit width per layer under a size budget, from measured sensitivities.

Given per-layer costs ``S_l(b)`` (the output divergence with only layer ``l`` at ``b`` bits,
:func:`~lowbit.analysis.sensitivity.bit_sensitivity`), layer sizes ``n_l`` (weights) and a budget
of ``B`` bits per weight on average, solve the multiple-choice knapsack::

    minimise  sum_l S_l(b_l)   subject to   sum_l n_l b_l <= B * sum_l n_l,   b_l in candidates

(the sum of per-layer divergences predicts the total to second order; HAWQ-V3, Yao et al., ICML
2021, solve the same problem by integer programming). The solver is a dynamic program over
layers keeping the Pareto front of (size, cost) partial solutions; it is exact unless the front
grows past ``max_states``, where it keeps the best solution per size bucket (``exact=False``).
Scales and zero points are not counted in the budget (they are the same for every choice of bits).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from torch import nn

from ..modules import WeightQuantizer
from ..quantize import quant_layers

__all__ = ["BitAllocation", "allocate_bits", "apply_bits"]


@dataclass
class BitAllocation:
    """Chosen ``bits`` per layer, the ``average_bits`` per weight it costs, and the predicted divergence."""

    bits: dict[str, int]
    average_bits: float
    budget: float
    predicted: float
    exact: bool

    def as_dict(self) -> dict:
        return asdict(self)


def allocate_bits(sensitivities: dict[str, dict[int, float]], sizes: dict[str, int], budget: float,
                  max_states: int = 20000) -> BitAllocation:
    """Bits per layer minimising the summed sensitivity with ``sum n_l b_l <= budget * sum n_l``.

    Raises ``ValueError`` if even the smallest candidate of every layer exceeds the budget.
    """
    if not sensitivities:
        raise ValueError("sensitivities is empty: measure them with bit_sensitivity first")
    missing = [n for n in sensitivities if n not in sizes]
    if missing:
        raise ValueError(f"sizes has no entry for layers {missing}; pass the number of weights of each layer")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"budget must be a positive number of bits per weight, got {budget!r}")
    names = list(sensitivities)
    total_weights = sum(int(sizes[n]) for n in names)
    limit = budget * total_weights
    if sum(int(sizes[n]) * min(sensitivities[n]) for n in names) > limit + 1e-9:
        low = sum(int(sizes[n]) * min(sensitivities[n]) for n in names) / total_weights
        raise ValueError(f"budget={budget} bits per weight is below the smallest possible size "
                         f"({low:.3f} bits per weight with the smallest candidates); raise the budget")
    states: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    exact = True
    for n in names:
        size = int(sizes[n])
        grown = [(c + size * b, v + float(s), ch + (b,)) for c, v, ch in states
                 for b, s in sensitivities[n].items() if c + size * b <= limit + 1e-9]
        states = _pareto(grown)
        if len(states) > max_states:
            states = _thin(states, max_states, limit)
            exact = False
    cost, value, choice = min(states, key=lambda s: (s[1], s[0]))
    return BitAllocation(bits=dict(zip(names, choice)), average_bits=cost / total_weights, budget=float(budget),
                         predicted=value, exact=exact)


def _pareto(states):
    states.sort(key=lambda s: (s[0], s[1]))
    front, best = [], float("inf")
    for s in states:
        if s[1] < best:
            front.append(s)
            best = s[1]
    return front


def _thin(states, max_states: int, limit: float):
    width = limit / max_states
    kept: dict[int, tuple] = {}
    for s in states:
        key = int(s[0] // width)
        if key not in kept or s[1] < kept[key][1]:
            kept[key] = s
    return _pareto(list(kept.values()))


def apply_bits(q: nn.Module, bits: dict[str, int]) -> nn.Module:
    """A copy of the (unfrozen) quantized model ``q`` with each named layer's weights at ``bits[name]``.

    Granularity, range method and activation grids stay as they are.
    """
    layers = dict(quant_layers(q))
    unknown = [n for n in bits if n not in layers]
    if unknown:
        raise ValueError(f"bits names layers {unknown} that q does not quantize; known: {list(layers)}")
    frozen = [n for n in bits if layers[n].frozen]
    if frozen:
        raise ValueError(f"layers {frozen} are frozen (integer weights); apply the bit allocation before lb.freeze")
    out = copy.deepcopy(q)
    for name, layer in quant_layers(out):
        if name in bits:
            old = layer.weight_quant
            layer.weight_quant = WeightQuantizer(old.spec.replace(bits=int(bits[name])), old.observer,
                                                 old.observer_options, old.ste)
    return out
