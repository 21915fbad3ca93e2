"""Checking that a function-preserving transform preserved the function.

BatchNorm folding, cross-layer equalization, SmoothQuant/AWQ factor folding and the float stage of
bias correction all claim ``f'(x) = f(x)`` up to float rounding. :func:`check_preserved` runs the
model before and after on a reference batch and raises ``ValueError`` when the largest absolute
change of any output exceeds ``rtol`` times the largest output magnitude (``rtol = 1e-4`` for
float32, more for 16-bit floats whose rounding alone is larger), naming the layers the transform
changed and the way out.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

__all__ = ["check_preserved", "output_tensors", "tolerance"]


def output_tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensors, tuples/lists, dicts, transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance: 1e-4, or 32 machine epsilons of a coarser float type."""
    return max(1e-4, 32 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4


@torch.no_grad()
def max_change(before: nn.Module, after: nn.Module, batch, call: Callable) -> tuple[float, float, torch.dtype]:
    """``(max |f'(x) - f(x)|, max |f(x)|, dtype)`` over all float outputs on ``batch``."""
    states = (before.training, after.training)
    before.eval()
    after.eval()
    try:
        ya, yb = output_tensors(call(before, batch)), output_tensors(call(after, batch))
    finally:
        before.train(states[0])
        after.train(states[1])
    if len(ya) != len(yb):
        raise ValueError(f"the transformed model returns {len(yb)} tensors, the original {len(ya)}")
    err, ref, dtype = 0.0, 0.0, torch.float32
    for a, b in zip(ya, yb):
        if a.shape != b.shape:
            raise ValueError(f"the transformed model returns shape {tuple(b.shape)} where the original gave {tuple(a.shape)}")
        fa, fb = a.double(), b.double()
        finite = torch.isfinite(fa) & torch.isfinite(fb)
        err = max(err, (fa - fb)[finite].abs().max().item() if finite.any() else 0.0)
        ref = max(ref, fa[finite].abs().max().item() if finite.any() else 0.0)
        dtype = a.dtype
    return err, ref, dtype


def check_preserved(before: nn.Module, after: nn.Module, batch, call: Callable, what: str,
                    changed: list[str], rtol: float | None = None) -> float:
    """Raise ``ValueError`` if ``after`` does not compute ``before``'s function on ``batch``; returns
    the relative change. ``changed`` names the layers the transform edited (for the message)."""
    err, ref, dtype = max_change(before, after, batch, call)
    tol = tolerance(dtype) if rtol is None else rtol
    rel = err / max(ref, 1e-30)
    if rel > tol:
        shown = ", ".join(changed[:6]) + (f" (and {len(changed) - 6} more)" if len(changed) > 6 else "")
        raise ValueError(f"{what} is meant to keep the model's function but changed its output on the reference "
                         f"batch by {err:.3g} (relative {rel:.2g} > {tol:.0e}); the layers it changed: {shown or 'none'}. "
                         f"Exclude the layer that misbehaves (exclude=[...]) and report the model architecture")
    return rel
