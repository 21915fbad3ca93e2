"""Exponential moving average of the per-batch extremes (:class:`MovingAverage`).

With momentum ``m`` (the weight of the new batch, as ``averaging_constant`` in
``torch.ao.quantization.MovingAverageMinMaxObserver``, whose update this reproduces)::

    min_0 = min(x_0),   min_t = min_{t-1} + m (min(x_t) - min_{t-1})      (and the same for max)

Outliers of a single batch move the range by only ``m`` times their excess, which is why QAT
(Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018) tracks activation ranges this way. The average is not associative, so
``merge``/``all_reduce`` combine the observers' averages weighted by their batch counts.
"""
from __future__ import annotations

import torch

from .base import Observer, pick

__all__ = ["MovingAverage"]


class MovingAverage(Observer):
    """Range ``[avg min, avg max]`` with ``momentum`` in ``(0, 1]`` (default 0.01, as torch)."""

    method = "moving_average"

    def __init__(self, spec, momentum: float = 0.01):
        super().__init__(spec)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise TypeError(f"momentum must be a number in (0, 1], got {type(momentum).__name__}")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1] (the weight of each new batch, e.g. 0.01), got {momentum}")
        self.momentum = float(momentum)

    def _options(self):
        return {"momentum": self.momentum}

    def _init_state(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        self.min = torch.full((n,), torch.inf, dtype=rows.dtype, device=rows.device)
        self.max = torch.full((n,), -torch.inf, dtype=rows.dtype, device=rows.device)
        self.seen = torch.zeros(n, dtype=rows.dtype, device=rows.device)  # batches with data, per row

    def _update_rows(self, rows, lo, hi, all_finite) -> None:
        lo, hi = lo.to(self.min.dtype), hi.to(self.max.dtype)
        has = torch.isfinite(lo)
        first = has & (self.seen == 0)
        m = self.momentum
        self.min = torch.where(first, lo, torch.where(has, self.min + m * (lo - self.min), self.min))
        self.max = torch.where(first, hi, torch.where(has, self.max + m * (hi - self.max), self.max))
        self.seen = self.seen + has.to(self.seen.dtype)

    def _range(self):
        empty = self.seen == 0
        return self.min.masked_fill(empty, 0.0), self.max.masked_fill(empty, 0.0)

    @staticmethod
    def _weighted(a, na, b, nb):
        total = na + nb
        a0 = torch.where(na > 0, a, torch.zeros_like(a))
        b0 = torch.where(nb > 0, b, torch.zeros_like(b))
        mean = (a0 * na + b0 * nb) / total.clamp_min(1)
        return torch.where(total > 0, mean, a)

    def _merge_state(self, other: "MovingAverage") -> None:
        n_other = other.seen.to(self.seen)
        self.min = self._weighted(self.min, self.seen, other.min.to(self.min), n_other)
        self.max = self._weighted(self.max, self.seen, other.max.to(self.max), n_other)
        self.seen = self.seen + n_other

    def _all_reduce_state(self, dist, group) -> None:
        has = self.seen > 0
        packed = torch.stack([torch.where(has, self.min * self.seen, torch.zeros_like(self.min)),
                              torch.where(has, self.max * self.seen, torch.zeros_like(self.max)), self.seen])
        dist.all_reduce(packed, group=group)
        total = packed[2]
        ok = total > 0
        self.min = torch.where(ok, packed[0] / total.clamp_min(1), torch.full_like(total, torch.inf))
        self.max = torch.where(ok, packed[1] / total.clamp_min(1), torch.full_like(total, -torch.inf))
        self.seen = total

    def _state(self):
        return {"min": self.min, "max": self.max, "seen": self.seen}

    def _load_state(self, state):
        self.min, self.max, self.seen = pick(state, "min", "max", "seen")
