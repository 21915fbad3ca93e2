"""Named recipes: a weight grid, an activation grid, observers and transforms under one name.

A recipe is what ``lowbit demo``, ``lowbit quantize --recipe NAME`` and the benchmarks run::

    q = lb.recipes.get("w4a8").apply(model, calibration_batches)   # quantized, calibrated, frozen

``Recipe.apply`` runs :func:`lowbit.transforms.quantize_with`: float-stage transforms ->
``lb.quantize`` -> ``lb.calibrate`` on the batches -> quantized-stage transforms (bias correction,
GPTQ) -> ``lb.freeze``. New recipes join with :func:`register`.

**Model families.** The best recipe behind a generic name can depend on the architecture: on
transformers, per-tensor int8 activations lose to a few outlier channels unless SmoothQuant moves
them into the weights first. ``get(name, family="transformer")`` returns the family's variant
registered with :func:`register_variant` (``w8a8`` -> ``w8a8-smooth``, ``w4g128`` ->
``w4g128-awq-gptq``), and the generic recipe
where the family has none; ``resolve`` tells which one that is. Every variant is also a recipe of
its own name, so it can be asked for directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from .spec import PerChannel, PerGroup, PerToken, QuantSpec
from .analysis.mixed_specs import mixed_precision
from .gptq import gptq
from .transforms import quantize_with, register_transform

__all__ = ["Recipe", "RECIPES", "VARIANTS", "get", "register", "register_variant", "resolve", "names",
           "families"]


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
    embeddings: QuantSpec | None = None     # grid of the nn.Embedding tables (None: they stay float)

    @property
    def needs_calibration(self) -> bool:
        return (self.activations is not None and not self.activations.dynamic) or bool(self.transforms)

    def quantize_options(self) -> dict:
        """The keyword arguments of ``lb.quantize`` this recipe stands for."""
        opts = {"weights": self.weights, "activations": self.activations, "observer": self.observer,
                "weight_observer": self.weight_observer, "exclude": list(self.exclude) or None}
        if self.embeddings is not None:
            opts["embeddings"] = self.embeddings
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


VARIANTS: dict[str, dict[str, str]] = {}   # family -> {generic recipe name -> the family's recipe name}


def register_variant(family: str, name: str, variant: str) -> None:
    """Make ``get(name, family=family)`` return the recipe ``variant`` (both must be registered)."""
    for arg, value in (("family", family), ("name", name), ("variant", variant)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{arg} must be a non-empty str, got {value!r}")
    for arg, value in (("name", name), ("variant", variant)):
        if value not in RECIPES:
            raise ValueError(f"{arg} {value!r} is not a registered recipe; register it first ({names()})")
    VARIANTS.setdefault(family, {})[name] = variant


def families() -> list[str]:
    return list(VARIANTS)


def resolve(name: str, family: str | None = None) -> str:
    """The name of the recipe ``get(name, family)`` returns."""
    if family is not None and family not in VARIANTS:
        raise ValueError(f"family must be one of {families()} or None, got {family!r}")
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {names()}, got {name!r}")
    return VARIANTS.get(family, {}).get(name, name) if family is not None else name


def get(name: str, family: str | None = None) -> Recipe:
    """The recipe called ``name`` (for ``family``: that family's variant of it, if it has one)."""
    return RECIPES[resolve(name, family)]


def names() -> list[str]:
    return list(RECIPES)


_W8 = QuantSpec(bits=8, granularity=PerChannel(0))
_A8 = QuantSpec(bits=8, symmetric=False)

for _r in (
    Recipe("w8a8", "int8 per-channel weights, int8 per-tensor activations, min/max ranges", _W8, _A8),
    Recipe("w8", "int8 per-channel weights (weight-only), min/max ranges", _W8),
    Recipe("w8a8-mse", "W8A8 with MSE-optimal ranges", _W8, _A8, observer="mse"),
    Recipe("w8a8-entropy", "W8A8 with KL (TensorRT entropy) activation ranges, max-abs weights", _W8, _A8,
           observer="entropy", weight_observer="minmax"),
    Recipe("w4a8", "int4 per-channel weights (MSE ranges, GPTQ), int8 activations, bias correction",
           QuantSpec(bits=4, granularity=PerChannel(0)), _A8, observer="mse", transforms=("gptq", "bias_correction")),
    Recipe("w4g128", "int4 weights in groups of 128 (weight-only)", QuantSpec(bits=4, granularity=PerGroup(128))),
    Recipe("w4g32", "int4 weights in groups of 32 (weight-only)", QuantSpec(bits=4, granularity=PerGroup(32))),
    Recipe("w2a8", "int2 per-channel asymmetric weights (MSE ranges), int8 activations, bias correction",
           QuantSpec(bits=2, symmetric=False, granularity=PerChannel(0)), _A8, observer="mse",
           transforms=("bias_correction",)),
):
    register(_r)

# -- transformers (measured on all-MiniLM-L6-v2: benchmarks/bench_transformer.py) ----------------------
def _gptq(q: nn.Module, batches, **options) -> nn.Module:
    gptq(q, batches, **options)   # in place; the report goes to the log
    return q


register_transform("gptq", "quantized", _gptq)   # GPTQ (Frantar et al. 2022) as a recipe step, before freeze


def _mixed(q: nn.Module, batches, **options) -> nn.Module:
    mixed_precision(q, batches, **options)   # in place; the allocation is q.lowbit_mixed
    return q


register_transform("mixed_precision", "quantized", _mixed)   # a weight spec per layer under a bits budget

_A8_TOKEN = QuantSpec(bits=8, symmetric=False, dynamic=True, granularity=PerToken())
_W4G128_ASYM = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(128))
# int8 embedding tables, one scale per row: MiniLM's cosine moves by 1e-4 and the model shrinks by 35 MB
_E8 = QuantSpec(bits=8, granularity=PerChannel(0))
_NF4DQ32 = QuantSpec(format="nf4_dq", granularity=PerGroup(32))

for _r in (
    Recipe("w8a8-smooth", "W8A8 (per-tensor static activations) after SmoothQuant (alpha 0.85); int8 embeddings",
           _W8, _A8, transforms=(("smooth_quant", {"alpha": 0.85}),), embeddings=_E8),
    Recipe("w8a8-dynamic", "int8 per-channel weights, int8 activations quantized per token at run time; int8 "
           "embeddings", _W8, _A8_TOKEN, embeddings=_E8),
    Recipe("w8a8-smooth-dynamic", "SmoothQuant (alpha 0.5), then int8 per-channel weights and per-token dynamic "
           "int8 activations; int8 embeddings", _W8, _A8_TOKEN, transforms=(("smooth_quant", {"alpha": 0.5}),),
           embeddings=_E8),
    Recipe("w4g128-gptq", "int4 weights in groups of 128 with zero points, GPTQ with act_order (weight-only); "
           "int8 embeddings", _W4G128_ASYM, transforms=(("gptq", {"act_order": True}),), embeddings=_E8),
    Recipe("w4g128-awq-gptq", "AWQ activation-aware column scales, then int4 weights in groups of 128 with zero "
           "points by GPTQ with act_order (weight-only); int8 embeddings", _W4G128_ASYM,
           transforms=(("awq", {"weights": _W4G128_ASYM}), ("gptq", {"act_order": True})), embeddings=_E8),
    Recipe("w4-mixed", "AWQ, then each Linear gets int4 g128 (zero points) or int8 per channel, chosen by per-layer "
           "sensitivity within 4.5 stored bits per weight (scales counted), then GPTQ with act_order; int8 "
           "embeddings", _W4G128_ASYM,
           transforms=(("awq", {"weights": _W4G128_ASYM}),
                       ("mixed_precision", {"candidates": [_W4G128_ASYM, _W8], "budget": 4.5}),
                       ("gptq", {"act_order": True})), embeddings=_E8),
    # NF4 with QLoRA's double-quantized scales costs 4.26 stored bits per weight at blocks of 32, so a
    # 4.5 budget buys int8 for ~6% of the weights; measured on MiniLM (docs/formats-table.md):
    # 0.9956 held-in / 0.9881 out-of-domain cosine at 4.47 bits/weight (w4-mixed: 0.9942 / 0.9837)
    Recipe("w4-nf4-mixed", "each Linear gets NF4 in blocks of 32 with double-quantized scales (4.26 bits/weight) "
           "or int8 per channel, chosen by per-layer sensitivity within 4.5 stored bits per weight (scales "
           "counted), then GPTQ with act_order; int8 embeddings", _NF4DQ32,
           transforms=(("mixed_precision", {"candidates": [_NF4DQ32, _W8], "budget": 4.5}),
                       ("gptq", {"act_order": True})), embeddings=_E8),
):
    register(_r)

# -- GGUF (llama.cpp) block grids: lb.export_gguf writes these codes bit-exactly -----------------------
_Q8_0 = QuantSpec(bits=8, granularity=PerGroup(32))
_Q4 = QuantSpec(bits=4, granularity=PerGroup(32))     # Q4_0: nibble = q + 8; Q4_K: dmin = 8 d, m_j = sc_j
_GGUF_GPTQ = ("gptq", {"keep_grid": True, "act_order": True})

for _r in (
    Recipe("gguf-q8_0", "llama.cpp Q8_0: int8 in blocks of 32 with fp16 scales (round to nearest)", _Q8_0,
           transforms=(("gguf_grid", {"qtype": "q8_0"}),)),
    Recipe("gguf-q4_0", "llama.cpp Q4_0: int4 in blocks of 32 with fp16 scales; AWQ, MSE ranges, GPTQ on the "
           "pinned grid", _Q4, observer="mse",
           transforms=(("awq", {"weights": _Q4, "explicit": False}), ("gguf_grid", {"qtype": "q4_0"}), _GGUF_GPTQ)),
    Recipe("gguf-q4_k", "llama.cpp Q4_K: int4 in blocks of 32, scales fp16 d x 6-bit per 256 (rows not a multiple "
           "of 256: Q4_0); AWQ, MSE ranges, GPTQ on the pinned grid", _Q4, observer="mse",
           transforms=(("awq", {"weights": _Q4, "explicit": False}), ("gguf_grid", {"qtype": "q4_k"}), _GGUF_GPTQ)),
):
    register(_r)

register_variant("transformer", "w8a8", "w8a8-smooth")
register_variant("transformer", "w4g128", "w4g128-awq-gptq")
