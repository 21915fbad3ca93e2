"""Shared state of the histogram observers (:class:`Percentile`, :class:`MSE`, :class:`Entropy`).

Per scale row: a histogram of ``bins`` counts on the power-of-two span ``[-2^e, 2^e]`` of
:mod:`lowbit.ops.histogram` (re-binned by merging bin pairs when a batch exceeds it, so memory is
constant), plus the finite min and max. Because that histogram depends only on the multiset of
values, streaming in any order, one pass over the concatenation, ``merge`` and ``all_reduce``
give identical counts.
"""
from __future__ import annotations

import torch

from ..ops.histogram import check_bins, grow_histogram, histogram_rows, span_exponent, span_of
from .base import Observer, pick

__all__ = ["HistogramObserver"]


class HistogramObserver(Observer):
    """Base of the histogram observers; ``bins`` (a power of two) is the histogram size."""

    def __init__(self, spec, bins: int = 4096):
        super().__init__(spec)
        self.bins = check_bins(bins)

    def _options(self):
        return {"bins": self.bins}

    def _init_state(self, rows: torch.Tensor) -> None:
        n, dev = rows.shape[0], rows.device
        self.counts = torch.zeros(n, self.bins, dtype=torch.int64, device=dev)
        self.exponent = span_exponent(torch.zeros(n, dtype=torch.float64, device=dev))
        self.min = torch.full((n,), torch.inf, dtype=rows.dtype, device=dev)
        self.max = torch.full((n,), -torch.inf, dtype=rows.dtype, device=dev)

    def _grow_to(self, exponent: torch.Tensor) -> None:
        target = torch.maximum(self.exponent, exponent)
        self.counts = grow_histogram(self.counts, self.exponent, target)
        self.exponent = target

    def _update_rows(self, rows, lo, hi, all_finite) -> None:
        self.min = torch.minimum(self.min, lo.to(self.min.dtype))
        self.max = torch.maximum(self.max, hi.to(self.max.dtype))
        maxabs = torch.where(torch.isfinite(lo), torch.maximum(lo.abs(), hi.abs()), torch.zeros_like(lo))
        self._grow_to(span_exponent(maxabs))
        self.counts += histogram_rows(rows, self.exponent, self.bins, all_finite)

    def extremes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row finite ``(min, max)`` seen so far (0 for rows without data)."""
        empty = self.min > self.max
        return self.min.masked_fill(empty, 0.0), self.max.masked_fill(empty, 0.0)

    @property
    def span(self) -> torch.Tensor:
        """Per-row half-width ``T`` of the histogram (float64)."""
        return span_of(self.exponent)

    def _merge_state(self, other: "HistogramObserver") -> None:
        target = torch.maximum(self.exponent, other.exponent.to(self.exponent))
        theirs = grow_histogram(other.counts.to(self.counts), other.exponent.to(self.exponent), target)
        self._grow_to(target)
        self.counts = self.counts + theirs
        self.min = torch.minimum(self.min, other.min.to(self.min))
        self.max = torch.maximum(self.max, other.max.to(self.max))

    def _all_reduce_state(self, dist, group) -> None:
        target = self.exponent.clone()
        dist.all_reduce(target, op=dist.ReduceOp.MAX, group=group)
        self._grow_to(target)
        dist.all_reduce(self.counts, group=group)
        dist.all_reduce(self.min, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(self.max, op=dist.ReduceOp.MAX, group=group)

    def _state(self):
        return {"counts": self.counts, "exponent": self.exponent, "min": self.min, "max": self.max}

    def _load_state(self, state):
        counts, exponent, lo, hi = pick(state, "counts", "exponent", "min", "max")
        if counts.dim() != 2 or counts.shape[1] != self.bins:
            raise ValueError(f"state counts have shape {tuple(counts.shape)}, this observer has bins={self.bins}")
        self.counts, self.exponent, self.min, self.max = counts, exponent, lo, hi
