"""KL-divergence calibration (:class:`Entropy`), the method of TensorRT and ONNX Runtime.

The streaming histogram (``2 * bins`` bins on a power-of-two span) is resampled onto ``bins``
bins over ``[-max|x|, max|x|]`` (uniform density inside a bin) and the threshold minimising
``KL(reference || quantized)`` is searched over all candidates at once; see
:mod:`lowbit.ops.entropy` (Migacz, "8-bit Inference with TensorRT", GTC 2017).
"""
from __future__ import annotations

import torch

from ..ops.entropy import ENTROPY_VARIANTS, entropy_threshold
from ..ops.histogram import check_bins, resample_histogram
from ..ops.ranges import quantized_bins_for
from .histogram import HistogramObserver

__all__ = ["Entropy"]


class Entropy(HistogramObserver):
    """Clip at the KL-optimal threshold; ``bins=2048`` and ``quantized_bins=2^bits - 1`` by default."""

    method = "entropy"

    def __init__(self, spec, bins: int = 2048, quantized_bins: int | None = None, variant: str = "onnxruntime"):
        super().__init__(spec, 2 * check_bins(bins))
        if variant not in ENTROPY_VARIANTS:
            raise ValueError(f"variant must be one of {ENTROPY_VARIANTS}, got {variant!r}")
        self.search_bins = bins
        self.quantized_bins = quantized_bins_for(spec, quantized_bins)
        self.variant = variant

    def _options(self):
        return {"bins": self.search_bins, "quantized_bins": self.quantized_bins, "variant": self.variant}

    def _range(self):
        lo, hi = self.extremes()
        m = torch.maximum(lo.abs(), hi.abs()).to(torch.float64)
        hist = resample_histogram(self.counts, self.span, -m, m, self.search_bins)
        return entropy_threshold(hist, lo, hi, self.quantized_bins, self.variant)
