"""Number formats: what integer grid a tensor is mapped onto.

A :class:`QuantSpec` describes the grid (bit width, signedness, symmetric or affine), how many
scales a tensor gets (the *granularity*) and how values are rounded onto the grid. It is a frozen,
hashable value object; every other layer of lowbit takes one.

The integer range is ``[qmin, qmax]``::

    signed,   b bits:  [-2^(b-1), 2^(b-1) - 1]     (narrow_range: [-2^(b-1) + 1, 2^(b-1) - 1])
    unsigned, b bits:  [0, 2^b - 1]                 (narrow_range: [1, 2^b - 1])

The narrow signed range is symmetric around zero, which keeps ``-x`` representable whenever ``x``
is (the convention of TensorRT and of most integer GEMM kernels for weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

import torch

__all__ = [
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "PerToken",
    "Granularity",
    "QuantSpec",
    "ROUNDING_MODES",
]

ROUNDING_MODES = ("nearest", "stochastic")


def _check_axis(axis: object, what: str) -> None:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{what}: axis must be an int, got {type(axis).__name__} {axis!r}")


@dataclass(frozen=True)
class PerTensor:
    """One scale (and zero point) for the whole tensor. ONNX: a scalar scale."""

    def param_shape(self, shape: torch.Size) -> tuple[int, ...]:
        return ()


@dataclass(frozen=True)
class PerChannel:
    """One scale per index along ``axis`` (output channels of a weight: ``axis=0``).

    ONNX: a 1-D scale of length ``shape[axis]`` with the ``axis`` attribute.
    """

    axis: int = 0

    def __post_init__(self) -> None:
        _check_axis(self.axis, "PerChannel")

    def param_shape(self, shape: torch.Size) -> tuple[int, ...]:
        axis = _normalize_axis(self.axis, len(shape), "PerChannel")
        return (shape[axis],)


@dataclass(frozen=True)
class PerGroup:
    """One scale per block of ``size`` consecutive elements along ``axis``.

    ONNX (blocked quantization, opset 21): the scale has the tensor's shape with ``shape[axis]``
    replaced by ``ceil(shape[axis] / size)``; the last block may be partial.
    """

    size: int = 128
    axis: int = -1

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise TypeError(f"PerGroup: size must be an int, got {type(self.size).__name__}")
        if self.size < 1:
            raise ValueError(f"PerGroup: size must be >= 1, got {self.size}; try 32, 64 or 128")
        _check_axis(self.axis, "PerGroup")

    def param_shape(self, shape: torch.Size) -> tuple[int, ...]:
        axis = _normalize_axis(self.axis, len(shape), "PerGroup")
        out = list(shape)
        out[axis] = -(-shape[axis] // self.size)
        return tuple(out)


@dataclass(frozen=True)
class PerToken:
    """One scale per row of the last dimension (per token of an activation ``[..., features]``).

    The scale has shape ``shape[:-1] + (1,)``; it is PerGroup with one group spanning the last axis.
    """

    def param_shape(self, shape: torch.Size) -> tuple[int, ...]:
        if len(shape) == 0:
            raise ValueError("PerToken needs a tensor with at least one dimension")
        return tuple(shape[:-1]) + (1,)


Granularity = Union[PerTensor, PerChannel, PerGroup, PerToken]
_GRANULARITIES = (PerTensor, PerChannel, PerGroup, PerToken)


def _normalize_axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}: axis {axis} is out of range for a {ndim}-D tensor")
    return axis % ndim


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid and how a tensor is mapped onto it.

    Args:
        bits: bit width, 2..16.
        signed: integers in ``[-2^(b-1), 2^(b-1)-1]`` (True) or ``[0, 2^b-1]`` (False).
        symmetric: the real range is ``[-R, R]`` with the zero point fixed at the grid's middle
            (0 for signed grids, ``2^(b-1)`` for unsigned); otherwise affine, ``[min, max]`` with a
            free zero point.
        granularity: :class:`PerTensor`, :class:`PerChannel`, :class:`PerGroup` or :class:`PerToken`.
        rounding: ``"nearest"`` (round half to even, as ONNX) or ``"stochastic"``
            (``floor(v) + Bernoulli(v - floor(v))``, unbiased).
        narrow_range: drop the lowest code (``qmin + 1``), e.g. int8 ``[-127, 127]``.
        dynamic: activations only: the scale is computed from each tensor at run time
            instead of from calibration.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = field(default_factory=PerTensor)
    rounding: Literal["nearest", "stochastic"] = "nearest"
    narrow_range: bool = False
    dynamic: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"QuantSpec: bits must be an int, got {type(self.bits).__name__} {self.bits!r}")
        if not 2 <= self.bits <= 16:
            raise ValueError(f"QuantSpec: bits must be in 2..16, got {self.bits}")
        for name in ("signed", "symmetric", "narrow_range", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantSpec: {name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.granularity, _GRANULARITIES):
            raise TypeError(
                "QuantSpec: granularity must be PerTensor(), PerChannel(axis), PerGroup(size, axis) "
                f"or PerToken(), got {self.granularity!r}"
            )
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"QuantSpec: rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")

    @property
    def qmin(self) -> int:
        low = -(1 << (self.bits - 1)) if self.signed else 0
        return low + 1 if self.narrow_range else low

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def levels(self) -> int:
        """Number of integer codes, ``qmax - qmin + 1``."""
        return self.qmax - self.qmin + 1

    @property
    def symmetric_zero_point(self) -> int:
        """The zero point a symmetric grid uses: 0 if signed, the middle code if unsigned."""
        return 0 if self.signed else 1 << (self.bits - 1)

    @property
    def storage_dtype(self) -> torch.dtype:
        """The smallest torch integer dtype that holds every code (before bit packing)."""
        if self.bits <= 8:
            return torch.int8 if self.signed else torch.uint8
        return torch.int16 if self.signed else torch.int32

    def param_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """Shape of scale and zero point for a tensor of ``shape`` (the ONNX convention)."""
        return self.granularity.param_shape(torch.Size(shape))

    def replace(self, **changes: object) -> "QuantSpec":
        """A copy with some fields changed (``spec.replace(bits=4)``)."""
        from dataclasses import replace

        return replace(self, **changes)

    def __str__(self) -> str:
        kind = ("int" if self.signed else "uint") + str(self.bits)
        g = self.granularity
        parts = [kind, "sym" if self.symmetric else "asym", type(g).__name__]
        if isinstance(g, PerChannel):
            parts[-1] += f"({g.axis})"
        elif isinstance(g, PerGroup):
            parts[-1] += f"({g.size},{g.axis})"
        if self.rounding != "nearest":
            parts.append(self.rounding)
        if self.narrow_range:
            parts.append("narrow")
        if self.dynamic:
            parts.append("dynamic")
        return "/".join(parts)
