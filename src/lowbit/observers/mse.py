"""MSE-optimal clipping (:class:`MSE`): the scale that minimises the expected squared error.

The error of each candidate scale is modelled from the streaming histogram (clipping error
exact per bin, values that round to zero exact, uniform rounding noise ``s^2/12`` elsewhere) and
searched per row, vectorised over rows; see :mod:`lowbit.ops.mse` (Banner et al., NeurIPS 2019).
The one-shot ``ops.choose_qparams(x, spec, observer="mse")`` additionally finds the exact
optimum on small tensors.
"""
from __future__ import annotations

from ..ops.ranges import mse_from_histogram
from .histogram import HistogramObserver

__all__ = ["MSE"]


class MSE(HistogramObserver):
    """Clip where the modelled quantization MSE is smallest."""

    method = "mse"

    def _range(self):
        lo, hi = self.extremes()
        return mse_from_histogram(self.counts, self.exponent, lo, hi, self.spec)
