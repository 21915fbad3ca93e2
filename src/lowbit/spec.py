"""Number formats: what grid a tensor is mapped onto.

A :class:`QuantSpec` describes the grid (its number ``format``: ``"int"`` grids of a bit width,
signedness, symmetric or affine, or one of the formats of :mod:`lowbit.formats` such as
``"fp8_e4m3"``, ``"nf4"``, ``"mxfp4"``), how many scales a tensor gets (the *granularity*) and how
values are rounded onto the grid. It is a frozen, hashable value object; every other layer of
lowbit takes one.

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

from . import formats as _formats

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
    """A grid (a number format) and how a tensor is mapped onto it.

    Args:
        bits: bit width, 2..16 (default 8); for a non-``"int"`` format it is the format's code
            width and may be left out.
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
        format: the number format, a name registered in :mod:`lowbit.formats`: ``"int"``
            (default, the integer grid above), ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"nf4"``,
            ``"nf4_dq"``, ``"mxfp4"``, ``"mxfp8"``, ``"mxint8"``, ``"nvfp4"``. Formats other than
            ``"int"`` are symmetric (no zero point); block formats default their granularity
            (NF4: ``PerGroup(64)``, MX: ``PerGroup(32)``, NVFP4: ``PerGroup(16)``) and the MX and
            NVFP4 formats require that block size.
    """

    bits: int = None  # type: ignore[assignment]  # resolved in __post_init__: 8, or the format's width
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = None  # type: ignore[assignment]  # resolved: PerTensor() or the format's block
    rounding: Literal["nearest", "stochastic"] = "nearest"
    narrow_range: bool = False
    dynamic: bool = False
    format: str = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.format, str):
            raise TypeError(f"QuantSpec: format must be a str naming a number format, got {type(self.format).__name__}")
        if self.format not in _formats.FORMATS:
            raise ValueError(f"QuantSpec: format must be one of {_formats.names()}, got {self.format!r}")
        fmt = _formats.get(self.format)
        if self.bits is None:
            object.__setattr__(self, "bits", 8 if fmt.integer_grid else fmt.bits)
        elif not fmt.integer_grid and self.bits != fmt.bits and not isinstance(self.bits, bool):
            raise ValueError(f"QuantSpec: format={self.format!r} has {fmt.bits}-bit codes, got bits={self.bits!r}; "
                             "leave bits out for this format")
        if self.granularity is None:
            object.__setattr__(self, "granularity", PerGroup(fmt.default_block) if fmt.default_block else PerTensor())
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
        if fmt.block_size is not None:
            g = self.granularity
            if not (isinstance(g, PerGroup) and g.size == fmt.block_size):
                raise ValueError(f"QuantSpec: format={self.format!r} shares one scale per block of {fmt.block_size}: "
                                 f"granularity must be PerGroup({fmt.block_size}) (or left out), got {g!r}")
        fmt.check_spec(self)

    @property
    def number_format(self) -> "_formats.NumberFormat":
        """The :class:`lowbit.formats.NumberFormat` object named by :attr:`format`."""
        return _formats.get(self.format)

    def _int_only(self, what: str) -> None:
        if self.format != "int":
            raise ValueError(f"spec.{what} describes integer grids; format={self.format!r} is not one "
                             "(use spec.number_format: its values(), max_value and code_range)")

    @property
    def qmin(self) -> int:
        self._int_only("qmin")
        return self.number_format.code_range(self)[0]

    @property
    def qmax(self) -> int:
        self._int_only("qmax")
        return self.number_format.code_range(self)[1]

    @property
    def levels(self) -> int:
        """Number of integer codes, ``qmax - qmin + 1``."""
        return self.qmax - self.qmin + 1

    @property
    def symmetric_zero_point(self) -> int:
        """The zero point a symmetric grid uses: 0 if signed, the middle code if unsigned (0 for
        formats without a zero point)."""
        return self.number_format.symmetric_zero_point(self)

    @property
    def storage_dtype(self) -> torch.dtype:
        """The smallest torch integer dtype that holds every code (before bit packing)."""
        return self.number_format.storage_dtype(self)

    @property
    def bits_per_weight(self) -> float:
        """Code bits plus the overhead of the scales (and stored zero points) per element; for
        per-tensor/per-channel grids the scale overhead is left out (it depends on the shape)."""
        return self.number_format.bits_per_weight(self)

    def param_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """Shape of scale and zero point for a tensor of ``shape`` (the ONNX convention)."""
        return self.granularity.param_shape(torch.Size(shape))

    def replace(self, **changes: object) -> "QuantSpec":
        """A copy with some fields changed (``spec.replace(bits=4)``). Changing ``format`` also
        resets ``bits`` and ``granularity`` to that format's defaults unless they are given."""
        from dataclasses import replace

        if "format" in changes and changes["format"] != self.format:
            changes.setdefault("bits", None)
            changes.setdefault("granularity", None)

        return replace(self, **changes)

    def __str__(self) -> str:
        g = self.granularity
        if self.format != "int":
            parts = [self.format, type(g).__name__]
        else:
            kind = ("int" if self.signed else "uint") + str(self.bits)
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
