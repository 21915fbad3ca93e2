"""Apply transforms by name: one call from a float model to a quantized one.

Every transform is optional; benchmarks and recipes name the ones they want::

    q = quantize_with(model, calib, weights=W4, activations=A8,
                      transforms=["bound", "equalize", "bias_correction"])

Each registered transform has a *stage*:

* ``"float"``: ``fn(model, batches, **options) -> model`` on the float model, before
  ``lb.quantize`` (``bound``, ``equalize``; SmoothQuant belongs here too);
* ``"quantized"``: ``fn(q, batches, **options) -> q`` on the quantized, calibrated model, before
  ``lb.freeze`` (``bias_correction``; GPTQ-like weight algorithms belong here).

Within a stage, transforms run in the order given (recommended: ``bound`` before ``equalize``, since
equalization turns a bound into per-channel bounds). New transforms join with
:func:`register_transform`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .. import batches as _batches
from .bias import bias_correction
from .bound import bound_activations
from .equalization import equalize

__all__ = ["Transform", "TRANSFORMS", "STAGES", "register_transform", "apply_transforms", "quantize_with"]

STAGES = ("float", "quantized")


@dataclass(frozen=True)
class Transform:
    """A named model transform: ``fn(model, batches, **options) -> new model`` at ``stage``."""

    name: str
    stage: str
    fn: Callable[..., nn.Module]


TRANSFORMS: dict[str, Transform] = {}


def register_transform(name: str, stage: str, fn: Callable[..., nn.Module]) -> None:
    """Make ``fn`` available by ``name`` to :func:`apply_transforms` and :func:`quantize_with`."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    TRANSFORMS[name] = Transform(name, stage, fn)


register_transform("bound", "float", lambda m, batches, **o: bound_activations(m, **o))
register_transform("equalize", "float", lambda m, batches, **o: equalize(m, **{"reference": batches[0], **o}))
register_transform("bias_correction", "quantized", lambda q, batches, **o: bias_correction(q, batches, **o))


def _parse(transforms: Sequence) -> list[tuple[Transform, dict]]:
    if isinstance(transforms, str):
        transforms = [transforms]
    out = []
    for t in transforms:
        if isinstance(t, str):
            name, options = t, {}
        elif isinstance(t, (tuple, list)) and len(t) == 2:
            name, options = t
        else:
            name, options = None, None
        if not isinstance(name, str) or not isinstance(options, dict):
            raise TypeError(f"transforms: each item is a name or a (name, options dict) pair, got {t!r}")
        if name not in TRANSFORMS:
            raise ValueError(f"transforms: unknown transform {name!r}; known: {sorted(TRANSFORMS)}")
        out.append((TRANSFORMS[name], options))
    return out


def apply_transforms(model: nn.Module, batches: Iterable | None, transforms: Sequence, stage: str) -> nn.Module:
    """Apply the transforms of ``stage`` among ``transforms`` in order; others are skipped.

    ``transforms`` holds names or ``(name, options)`` pairs. Returns the new model (``model`` is
    not modified: every transform returns a copy).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    for t, options in _parse(transforms):
        if t.stage == stage:
            model = t.fn(model, batches, **options)
    return model


@torch.inference_mode(False)   # what it builds stays ordinary tensors when called inside inference_mode
def quantize_with(model: nn.Module, batches: Iterable, *, transforms: Sequence = (), freeze: bool = True,
                  **quantize_options) -> nn.Module:
    """Float transforms -> ``lb.quantize`` -> ``lb.calibrate`` on ``batches`` -> quantized transforms -> ``lb.freeze``.

    ``quantize_options`` go to ``lb.quantize`` (``weights``, ``activations``, ``observer``, ...).
    ``batches`` (calibration inputs, see :mod:`lowbit.batches`) serve calibration and the
    data-aware transforms. ``model`` is not modified.
    """
    from ..quantize import calibrate, freeze as _freeze, quantize   # same layer; imported late (quantize imports us)

    parsed = _parse(transforms)   # fail on a bad name before any work
    data = _batches.as_batches(batches)
    model = apply_transforms(model, data, [(t.name, o) for t, o in parsed], "float")
    q = quantize(model, **quantize_options)
    device = _batches.model_device(q)
    with calibrate(q):
        for b in data:
            _batches.call(q, b, device)
    q = apply_transforms(q, data, [(t.name, o) for t, o in parsed], "quantized")
    return _freeze(q) if freeze else q
