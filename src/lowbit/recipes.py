"""Named recipes: a weight grid, an activation grid, observers and transforms under one name.

A recipe is what ``lowbit demo``, ``lowbit quantize --recipe NAME`` and the benchmarks run::

    q = lb.recipes.get("w4a8").apply(model, calibration_batches)   # quantized, calibrated, frozen

``Recipe.apply`` runs :func:`lowbit.transforms.quantize_with`: float-stage transforms ->
``lb.quantize`` -> ``lb.calibrate`` on the batches -> quantized-stage transforms (bias correction,
GPTQ) -> ``lb.freeze``. New recipes join with :func:`register`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from .spec import PerChannel, PerGroup, QuantSpec
from .transforms import quantize_with

__all__ = ["Recipe", "RECIPES", "get", "register", "names"]


@dataclass(frozen=True)
class Recipe:
    """A complete quantization recipe (see the module docstring)."""

    name: str
    description: str
    weights: QuantSpec
    activations: QuantSpec | None = None
    observer: str = "minmax"
    weight_observer: str | None = None
    transforms: tuple = ()
    exclude: tuple[str, ...] = ()
    observer_options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def needs_calibration(self) -> bool:
        return (self.activations is not None and not self.activations.dynamic) or bool(self.transforms)

    def quantize_options(self) -> dict:
        """The keyword arguments of ``lb.quantize`` this recipe stands for."""
        opts = {"weights": self.weights, "activations": self.activations, "observer": self.observer,
                "weight_observer": self.weight_observer, "exclude": list(self.exclude) or None}
        if self.observer_options:
            opts["observer_options"] = dict(self.observer_options)
        return opts

    def apply(self, model: nn.Module, batches: Iterable | None = None, *, freeze: bool = True,
              exclude: Iterable[str] | None = None) -> nn.Module:
        """Quantize a copy of ``model`` with this recipe, calibrated on ``batches``.

        ``exclude`` adds module-name patterns to keep float. ``model`` is not modified.
        """
        opts = self.quantize_options()
        if exclude:
            opts["exclude"] = list(self.exclude) + list(exclude)
        if batches is None:
            if self.needs_calibration:
                raise ValueError(f"recipe {self.name!r} needs calibration batches (model inputs); pass batches=")
            from .quantize import freeze as _freeze, quantize

            q = quantize(model, **opts)
            return _freeze(q) if freeze else q
        return quantize_with(model, batches, transforms=list(self.transforms), freeze=freeze, **opts)


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add ``recipe`` under ``recipe.name`` (replacing one of the same name)."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a lowbit.recipes.Recipe, got {type(recipe).__name__}")
    RECIPES[recipe.name] = recipe
    return recipe


def get(name: str) -> Recipe:
    """The recipe called ``name``."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {names()}, got {name!r}")
    return RECIPES[name]


def names() -> list[str]:
    return list(RECIPES)


_W8 = QuantSpec(bits=8, granularity=PerChannel(0))
_A8 = QuantSpec(bits=8, symmetric=False)

for _r in (
    Recipe("w8a8", "int8 per-channel weights, int8 per-tensor activations, min/max ranges", _W8, _A8),
    Recipe("w8a8-mse", "W8A8 with MSE-optimal ranges", _W8, _A8, observer="mse"),
    Recipe("w8a8-entropy", "W8A8 with KL (TensorRT entropy) activation ranges, max-abs weights", _W8, _A8,
           observer="entropy", weight_observer="minmax"),
    Recipe("w4a8", "int4 per-channel weights (MSE ranges), int8 activations, bias correction",
           QuantSpec(bits=4, granularity=PerChannel(0)), _A8, observer="mse", transforms=("bias_correction",)),
    Recipe("w4g128", "int4 weights in groups of 128 (weight-only)", QuantSpec(bits=4, granularity=PerGroup(128))),
    Recipe("w4g32", "int4 weights in groups of 32 (weight-only)", QuantSpec(bits=4, granularity=PerGroup(32))),
    Recipe("w2a8", "int2 per-channel weights (MSE ranges), int8 activations, bias correction",
           QuantSpec(bits=2, granularity=PerChannel(0)), _A8, observer="mse", transforms=("bias_correction",)),
):
    register(_r)
