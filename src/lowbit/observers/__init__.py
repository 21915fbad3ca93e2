"""Streaming range calibration: statistics of tensors -> ``(scale, zero_point)``.

One small class per estimator, each built for a :class:`~lowbit.QuantSpec` (per-tensor,
per-channel or per-group statistics from the first batch) with ``update(x)``, ``qparams()``,
``merge(other)``, ``all_reduce(group)`` and ``state_dict()``; see :mod:`lowbit.observers.base`.
``lowbit.ops.choose_qparams(x, spec, observer=name)`` is the one-shot form of each (``name`` is
the class's ``method``).
"""
from .base import NotCalibratedError, Observer
from .entropy import Entropy
from .histogram import HistogramObserver
from .minmax import MaxAbs, MinMax
from .moving_average import MovingAverage
from .mse import MSE
from .percentile import Percentile

OBSERVERS = {cls.method: cls for cls in (MinMax, MaxAbs, MovingAverage, Percentile, MSE, Entropy)}

__all__ = ["Observer", "NotCalibratedError", "HistogramObserver", "MinMax", "MaxAbs", "MovingAverage",
           "Percentile", "MSE", "Entropy", "OBSERVERS"]
