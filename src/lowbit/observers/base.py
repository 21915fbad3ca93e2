"""The observer protocol: streaming statistics of a tensor -> ``(scale, zero_point)``.

An observer is built for a :class:`~lowbit.QuantSpec`; the first batch fixes the parameter layout
(one statistic per scale row, see :func:`lowbit.ops.to_rows`: per tensor, per channel along the
spec's axis, per group), and every later batch must give the same number of rows. Memory is
constant in the number of batches.

* ``update(x)`` folds a batch in (``x`` is never modified). Non-finite values (e.g. ``-inf``
  attention masks) are skipped and counted in ``nonfinite_count``.
* ``qparams()`` returns ``(scale, zero_point)`` shaped as ONNX expects (as
  :func:`lowbit.ops.choose_qparams`); before any data it raises :class:`NotCalibratedError`.
* ``merge(other)`` folds another observer's statistics in (same class, spec and options), so
  ``a.merge(b)`` equals one observer that saw both streams; ``all_reduce(group)`` does the same in
  place across the processes of a ``torch.distributed`` group.
* ``state_dict()`` / ``load_state_dict()`` expose the statistics as a flat dict of tensors, so a
  checkpoint can store calibration.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..ops import to_rows
from ..ops.qparams import qparams_from_range
from ..spec import PerToken, QuantSpec

__all__ = ["Observer", "NotCalibratedError"]


class NotCalibratedError(ValueError, RuntimeError):
    """``qparams()`` was asked of an observer that has seen no data."""


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group); use merge() within one process")
    return dist


class Observer:
    """Base class; subclasses keep per-row state tensors and implement the hooks below."""

    #: the name under which ``ops.choose_qparams(x, spec, observer=...)`` has the one-shot form
    method: str = ""

    def __init__(self, spec: QuantSpec):
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a lowbit.QuantSpec, got {type(spec).__name__}")
        if isinstance(spec.granularity, PerToken):
            raise ValueError("PerToken scales change with every batch and cannot be calibrated; use "
                             "QuantSpec(dynamic=True) or ops.choose_qparams on each tensor")
        self.spec = spec
        self._shape: tuple[int, ...] | None = None
        self.nonfinite_count = 0
        self.batches = 0

    # ----------------------------------------------------------------- hooks for subclasses
    def _init_state(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def _update_rows(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, all_finite: bool) -> None:
        """Fold in ``rows`` whose per-row finite extremes are ``lo``/``hi`` (``+inf``/``-inf`` for a
        row without finite values); ``all_finite`` says no value needs masking."""
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _merge_state(self, other: "Observer") -> None:
        raise NotImplementedError

    def _all_reduce_state(self, dist, group) -> None:
        raise NotImplementedError

    def _state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        return {}

    # ----------------------------------------------------------------- public API
    @property
    def calibrated(self) -> bool:
        """Whether any batch has been seen."""
        return self._shape is not None

    def update(self, x: torch.Tensor) -> "Observer":
        """Fold the batch ``x`` into the statistics; returns ``self``.

        Under ``torch.inference_mode`` (``SentenceTransformer.encode`` runs there) the statistics are
        still kept as ordinary tensors, so later batches outside that mode can update them in place.
        """
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self.update(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError("x is empty: an observer needs at least one value per batch")
        x = x.detach()
        rows = to_rows(x, self.spec)
        if rows.dtype not in (torch.float32, torch.float64):
            rows = rows.float()
        if self._shape is None:
            self._init_state(rows)
            self._shape = tuple(x.shape)
        else:
            expected = math.prod(self.spec.param_shape(self._shape))
            if rows.shape[0] != expected:
                raise ValueError(
                    f"x of shape {tuple(x.shape)} gives {rows.shape[0]} scale rows for {self.spec.granularity!r}, "
                    f"but the first batch (shape {self._shape}) gave {expected}; keep the quantized axis the same"
                )
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)  # NaN and inf propagate: one cheap check
        all_finite = bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())
        if not all_finite:
            self.nonfinite_count += int((~torch.isfinite(x)).sum())
            finite = torch.isfinite(rows)
            self._finite_seen = self.__dict__.get("_finite_seen", False) or bool(finite.any())
            lo = torch.where(finite, rows, torch.inf).amin(dim=1)
            hi = torch.where(finite, rows, -torch.inf).amax(dim=1)
        else:
            self._finite_seen = True
        self._update_rows(rows, lo, hi, all_finite)
        self.batches += 1
        return self

    def _require_data(self) -> None:
        if self._shape is None:
            raise NotCalibratedError(
                f"{type(self).__name__} has seen no data: run calibration first (call update(x) on "
                "representative batches, e.g. inside lowbit.calibrate)")

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated real range ``(lo, hi)``, one entry per scale row."""
        self._require_data()
        if not self.__dict__.get("_finite_seen", True):
            raise NotCalibratedError(
                f"{type(self).__name__} saw only non-finite values ({self.nonfinite_count} NaN/Inf and no finite "
                "value): check the calibration inputs, or the layer before this one (an overflow in float16?)")
        return self._range()

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the range observed so far, shaped as ONNX expects."""
        lo, hi = self.range()
        return qparams_from_range(lo, hi, self._shape, self.spec)

    def _check_compatible(self, other: "Observer") -> None:
        if type(other) is not type(self):
            raise TypeError(f"can only merge a {type(self).__name__} with another, got {type(other).__name__}")
        if other.spec != self.spec or other._options() != self._options():
            raise ValueError(f"cannot merge observers built differently: {self.spec} {self._options()} vs "
                             f"{other.spec} {other._options()}")
        if self._shape is not None and other._shape is not None:
            mine, theirs = self.spec.param_shape(self._shape), self.spec.param_shape(other._shape)
            if mine != theirs:
                raise ValueError(f"cannot merge observers of parameter shapes {mine} and {theirs}")

    def merge(self, other: "Observer") -> "Observer":
        """Fold ``other``'s statistics into this observer (``other`` is unchanged); returns ``self``."""
        self._check_compatible(other)
        if other._shape is None:
            return self
        if self._shape is None:
            self._shape = other._shape
            self._load_state({k: v.clone() for k, v in other._state().items()})
        else:
            self._merge_state(other)
        self._finite_seen = self.__dict__.get("_finite_seen", True) or other.__dict__.get("_finite_seen", True)
        self.nonfinite_count += other.nonfinite_count
        self.batches += other.batches
        return self

    def all_reduce(self, group=None) -> "Observer":
        """Merge the statistics of every process of ``group`` in place (a collective: every rank
        calls it; every rank must have seen data, else all raise :class:`NotCalibratedError`)."""
        dist = _dist()
        seen = torch.tensor([1 if self._shape is not None else 0], dtype=torch.int64)
        if self._shape is not None:
            seen = seen.to(self._device())
        dist.all_reduce(seen, op=dist.ReduceOp.MIN, group=group)
        if int(seen) == 0:
            raise NotCalibratedError("a process of the group has seen no data: run calibration on every rank first")
        counters = torch.tensor([self.nonfinite_count, self.batches], dtype=torch.int64, device=self._device())
        dist.all_reduce(counters, group=group)
        self._all_reduce_state(dist, group)
        self.nonfinite_count, self.batches = (int(v) for v in counters.tolist())
        return self

    def _device(self) -> torch.device:
        return next(iter(self._state().values())).device

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The statistics as a flat dict of tensors (empty statistics if no data was seen)."""
        out = {"nonfinite_count": torch.tensor(self.nonfinite_count), "batches": torch.tensor(self.batches)}
        if self._shape is not None:
            out["shape"] = torch.tensor(self._shape, dtype=torch.int64)
            out.update({k: v.clone() for k, v in self._state().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "Observer":
        """Restore statistics saved by :meth:`state_dict` of an observer built the same way."""
        if not isinstance(state, dict) or "nonfinite_count" not in state or "batches" not in state:
            raise ValueError("state must be a dict from Observer.state_dict()")
        if "shape" in state:
            shape = tuple(int(v) for v in state["shape"].tolist())
            rest = {k: v.clone() for k, v in state.items() if k not in ("shape", "nonfinite_count", "batches")}
            self._load_state(rest)
            self._shape = shape
        else:
            self._shape = None
        self.nonfinite_count = int(state["nonfinite_count"])
        self.batches = int(state["batches"])
        return self

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({self.spec}{opts}, batches={self.batches})"


def pick(state: dict[str, torch.Tensor], *names: str) -> list[torch.Tensor]:
    """Fetch required entries of a state dict with a clear error."""
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"state is missing {missing}; it was not saved by this kind of observer")
    return [state[n] for n in names]
