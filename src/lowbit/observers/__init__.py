"""TEMPORARY stub (replaced by the observers branch): streaming MinMax / MaxAbs."""
import torch

from ..ops import range_to_qparams
from ..ops.params import from_rows, to_rows
from ..ops.qparams import finite_minmax


class MinMax:
    def __init__(self, spec):
        self.spec, self.lo, self.hi, self.shape = spec, None, None, None

    def update(self, x):
        rows = to_rows(x.detach().float(), self.spec)
        lo, hi = finite_minmax(rows)
        self.shape = x.shape
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def qparams(self):
        if self.lo is None:
            raise ValueError("run calibration first")
        s, z = range_to_qparams(self.lo, self.hi, self.spec)
        return from_rows(s, self.shape, self.spec), from_rows(z, self.shape, self.spec)


class MaxAbs(MinMax):
    def update(self, x):
        super().update(x)
        r = torch.maximum(self.lo.abs(), self.hi.abs())
        self.lo, self.hi = -r, r
