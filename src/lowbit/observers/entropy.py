"""KL-divergence calibration (:class:`Entropy`), the method of TensorRT and ONNX Runtime.

``variant="tensorrt"`` (default; :mod:`lowbit.ops.entropy_trt`): the streaming histogram
(``2 * bins`` bins on the power-of-two span ``[-2^e, 2^e]``) folds exactly into ``bins`` bins of
``|x|`` on ``[0, 2^e]`` (exact zeros stay alone in bin 0, which TensorRT's ``h[0] = h[1]``
replaces), and TensorRT's search runs from the threshold ``128 max|x| / bins`` (its
``start_bin=128``, as the one-shot form), with ``Q`` from the grid unless ``quantized_bins`` is given.

``variant="onnxruntime"`` / ``"mxnet"`` (:mod:`lowbit.ops.entropy`): the histogram is resampled
onto ``bins`` bins over ``[-max|x|, max|x|]`` (uniform density inside a bin) and ONNX Runtime's
search runs with ``Q = 2^bits - 1`` unless given (Migacz, "8-bit Inference with TensorRT", GTC 2017).
"""
from __future__ import annotations

import torch

from ..ops.entropy import entropy_threshold
from ..ops.entropy_trt import START_BIN, tensorrt_threshold
from ..ops.histogram import check_bins, fold_histogram, resample_histogram
from ..ops.ranges import check_variant, clip_to_threshold, quantized_bins_for, tensorrt_bins_for
from .histogram import HistogramObserver

__all__ = ["Entropy"]


class Entropy(HistogramObserver):
    """Clip at the KL-optimal threshold (TensorRT's search by default, ``bins=2048``)."""

    method = "entropy"

    def __init__(self, spec, bins: int = 2048, quantized_bins: int | None = None, variant: str = "tensorrt"):
        super().__init__(spec, 2 * check_bins(bins))
        self.search_bins = bins
        self.variant = check_variant(variant)
        if quantized_bins is not None:
            quantized_bins_for(spec, quantized_bins)
        self.quantized_bins = quantized_bins if variant == "tensorrt" else quantized_bins_for(spec, quantized_bins)

    def _options(self):
        return {"bins": self.search_bins, "quantized_bins": self.quantized_bins, "variant": self.variant}

    def _range(self):
        lo, hi = self.extremes()
        m = torch.maximum(lo.abs(), hi.abs()).to(torch.float64)
        if self.variant == "tensorrt":
            span = self.span
            abs_hist = fold_histogram(self.counts)           # bins of width span / bins from 0
            ratio = torch.where(span > 0, m / span.clamp_min(1e-300), torch.ones_like(span))
            start = (START_BIN * ratio).floor().clamp_min(1).to(torch.int64)
            t = tensorrt_threshold(abs_hist, span / self.search_bins,
                                   tensorrt_bins_for(self.spec, self.quantized_bins, lo, hi), start)
            return clip_to_threshold(torch.minimum(t, m), lo, hi)
        hist = resample_histogram(self.counts, self.span, -m, m, self.search_bins)
        return entropy_threshold(hist, lo, hi, self.quantized_bins, self.variant)
