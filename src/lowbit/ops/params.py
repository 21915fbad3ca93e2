"""Scale and zero-point shapes: validation, broadcasting, and the "rows" view of a tensor.

Shapes follow ONNX QuantizeLinear: a scalar for :class:`PerTensor`, a 1-D tensor of length
``x.shape[axis]`` for :class:`PerChannel`, ``x.shape`` with ``shape[axis]`` replaced by
``ceil(shape[axis] / size)`` for :class:`PerGroup` (the last group may be partial), and
``x.shape[:-1] + (1,)`` for :class:`PerToken`.

``to_rows`` lays a tensor out as a 2-D ``[num_params, elements_per_param]`` matrix whose row ``i``
holds the elements that share scale ``i`` (a partial last group is padded with NaN, which every
statistic treats as missing). Statistics computed per row become parameters with ``from_rows``.
"""
from __future__ import annotations

import math
import numbers

import torch

from ..spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, _normalize_axis

__all__ = ["to_rows", "from_rows", "broadcast_param", "check_qparams", "as_param"]


def to_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``[num_params, elements_per_param]`` view (or padded copy) of ``x``; see module docstring."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return x.reshape(1, -1)
    if x.dim() == 0:
        raise ValueError(f"{type(g).__name__} granularity needs a tensor with at least one dimension")
    if isinstance(g, PerChannel):
        axis = _normalize_axis(g.axis, x.dim(), "PerChannel")
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    if isinstance(g, PerToken):
        return x.reshape(-1, x.shape[-1])
    if not isinstance(g, PerGroup):
        raise TypeError(f"spec.granularity must be PerTensor, PerChannel, PerToken or PerGroup, got {type(g).__name__}")
    axis = _normalize_axis(g.axis, x.dim(), "PerGroup")
    moved = x.movedim(axis, -1)
    n = moved.shape[-1]
    groups = -(-n // g.size)
    pad = groups * g.size - n
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad), value=float("nan"))
    return moved.reshape(-1, g.size)


def from_rows(values: torch.Tensor, shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> torch.Tensor:
    """Reshape a per-row vector (as produced from :func:`to_rows`) to the parameter shape."""
    g = spec.granularity
    shape = torch.Size(shape)
    if isinstance(g, PerTensor):
        return values.reshape(())
    if isinstance(g, PerGroup):
        axis = _normalize_axis(g.axis, len(shape), "PerGroup")
        moved = list(shape)
        moved.append(moved.pop(axis))
        moved[-1] = -(-shape[axis] // g.size)
        return values.reshape(moved).movedim(-1, axis)
    return values.reshape(spec.param_shape(shape))


def as_param(value: torch.Tensor | float | int, name: str, dtype: torch.dtype | None = None,
             device: torch.device | None = None) -> torch.Tensor:
    """Accept a Python (or NumPy) real number or a tensor for ``scale``/``zero_point``; return a tensor."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
    if dtype is not None and not dtype.is_floating_point:
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return torch.tensor(int(value), dtype=dtype, device=device)
    return torch.tensor(float(value), dtype=dtype, device=device)


def check_qparams(x_shape: torch.Size, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor,
                  values: bool = True) -> None:
    """Raise ``ValueError`` unless scale/zero_point fit ``spec`` and a tensor of ``x_shape``.

    Checks: shapes (ONNX convention, a one-element tensor is accepted for PerTensor), and with
    ``values`` (a host synchronisation) scale finite and > 0, zero point integral and inside
    ``[qmin, qmax]``. Modules check values once, when their qparams are set, and pass
    ``values=False`` on every forward (which also keeps ``torch.compile`` graphs whole).
    """
    expected = spec.param_shape(x_shape)
    for name, p in (("scale", scale), ("zero_point", zero_point)):
        ok = tuple(p.shape) == expected or (expected == () and p.numel() == 1)
        if not ok:
            raise ValueError(
                f"{name} has shape {tuple(p.shape)} but {spec.granularity!r} on a tensor of shape "
                f"{tuple(x_shape)} needs shape {expected}; compute it with ops.choose_qparams(x, spec)"
            )
    if not scale.is_floating_point():
        raise TypeError(f"scale must be a floating-point tensor, got {scale.dtype}")
    if not values:
        return
    s = scale.detach()
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError(f"scale must be finite and > 0 everywhere, got min {s.min().item():g}")
    z = zero_point.detach()
    if z.is_complex() or z.dtype == torch.bool:
        raise TypeError(f"zero_point must be an integer (or integral float) tensor, got {z.dtype}")
    if z.is_floating_point() and not bool((torch.isfinite(z) & (z == z.round())).all()):
        raise ValueError("zero_point must hold finite integers, e.g. from ops.choose_qparams")
    zlo, zhi = spec.number_format.zero_point_range(spec)
    if z.numel() and (int(z.min()) < zlo or int(z.max()) > zhi):
        raise ValueError(
            f"zero_point must lie in [{zlo}, {zhi}] for {spec}, "
            f"got values in [{int(z.min())}, {int(z.max())}]"
        )


def broadcast_param(p: torch.Tensor, x_shape: torch.Size, spec: QuantSpec) -> torch.Tensor:
    """Reshape/expand a validated parameter so that it broadcasts against a tensor of ``x_shape``."""
    g = spec.granularity
    ndim = len(x_shape)
    if isinstance(g, PerTensor):
        return p.reshape(())
    if isinstance(g, PerChannel):
        axis = _normalize_axis(g.axis, ndim, "PerChannel")
        view = [1] * ndim
        view[axis] = x_shape[axis]
        return p.reshape(view)
    if isinstance(g, PerToken):
        return p
    if not isinstance(g, PerGroup):
        raise TypeError(f"spec.granularity must be PerTensor, PerChannel, PerToken or PerGroup, got {type(g).__name__}")
    axis = _normalize_axis(g.axis, ndim, "PerGroup")
    expanded = p.repeat_interleave(g.size, dim=axis)
    n = x_shape[axis]
    return expanded if expanded.shape[axis] == n else expanded.narrow(axis, 0, n)


def num_params(x_shape: torch.Size, spec: QuantSpec) -> int:
    return math.prod(spec.param_shape(x_shape))
