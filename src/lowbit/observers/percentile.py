"""Percentile clipping (:class:`Percentile`): ignore the rarest ``100 - p`` percent of values.

Symmetric grids clip at the ``p``-th percentile of ``|x|``; affine grids cut ``(100 - p) / 2``
percent from each end (ONNX Runtime's ``PercentileCalibrater`` convention), never beyond the
observed min/max. Read from the streaming histogram with linear interpolation inside a bin, so
the result is within one bin (``2T / bins``) of the exact percentile of everything seen.
McKinstry et al., "Discovering Low-Precision Networks Close to Full-Precision Networks for
Efficient Embedded Inference", 2018.
"""
from __future__ import annotations

import torch

from ..ops.histogram import fold_histogram, histogram_quantile
from ..ops.ranges import check_percentile
from .histogram import HistogramObserver

__all__ = ["Percentile"]


class Percentile(HistogramObserver):
    """Clip to the ``p``-th percentile (default 99.99)."""

    method = "percentile"

    def __init__(self, spec, p: float = 99.99, bins: int = 4096):
        super().__init__(spec, bins)
        self.p = check_percentile(p)

    def _options(self):
        return {"p": self.p, "bins": self.bins}

    def _range(self):
        lo, hi = self.extremes()
        t = self.span
        if self.spec.symmetric:
            r = histogram_quantile(fold_histogram(self.counts), torch.zeros_like(t), t, self.p / 100.0)
            r = r.to(lo.dtype)
            return torch.maximum(-r, lo.clamp(max=0)), torch.minimum(r, hi.clamp(min=0))
        cut = (100.0 - self.p) / 200.0
        q_lo = histogram_quantile(self.counts, -t, t, cut).to(lo.dtype)
        q_hi = histogram_quantile(self.counts, -t, t, 1.0 - cut).to(hi.dtype)
        return torch.maximum(q_lo, lo), torch.minimum(q_hi, hi)
