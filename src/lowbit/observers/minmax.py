"""Running extremes: :class:`MinMax` (``[min x, max x]``) and :class:`MaxAbs` (``[-max|x|, max|x|]``).

Both keep the per-row finite minimum and maximum over every batch, so streaming equals one pass
over the concatenation exactly, and merging is an element-wise min/max (exact and associative).
``MaxAbs`` differs only in the range it reports: symmetric around zero even for affine grids.
"""
from __future__ import annotations

import torch

from .base import Observer, pick

__all__ = ["MinMax", "MaxAbs"]


class MinMax(Observer):
    """Range ``[min x, max x]`` over everything seen (affine grids widen it to contain 0)."""

    method = "minmax"

    def _init_state(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        self.min = torch.full((n,), torch.inf, dtype=rows.dtype, device=rows.device)
        self.max = torch.full((n,), -torch.inf, dtype=rows.dtype, device=rows.device)

    def _update_rows(self, rows, lo, hi, all_finite) -> None:
        self.min = torch.minimum(self.min, lo.to(self.min.dtype))
        self.max = torch.maximum(self.max, hi.to(self.max.dtype))

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        empty = self.min > self.max  # rows that only ever saw non-finite values
        return self.min.masked_fill(empty, 0.0), self.max.masked_fill(empty, 0.0)

    def _merge_state(self, other: "MinMax") -> None:
        self.min = torch.minimum(self.min, other.min.to(self.min))
        self.max = torch.maximum(self.max, other.max.to(self.max))

    def _all_reduce_state(self, dist, group) -> None:
        dist.all_reduce(self.min, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(self.max, op=dist.ReduceOp.MAX, group=group)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"min": self.min, "max": self.max}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.min, self.max = pick(state, "min", "max")


class MaxAbs(MinMax):
    """Range ``[-max|x|, max|x|]``: nothing saturates, and 0 sits in the middle of the range."""

    method = "maxabs"

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super()._range()
        r = torch.maximum(lo.abs(), hi.abs())
        return -r, r
