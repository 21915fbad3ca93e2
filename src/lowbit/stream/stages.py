"""A recipe as a list of steps applied to one unit (head, decoder layer, tail) at a time.

``Recipe.apply`` on a whole model runs: float-stage transforms (AWQ, SmoothQuant) -> ``lb.quantize``
-> ``lb.calibrate`` -> quantized-stage transforms (GPTQ, the GGUF grid) -> ``lb.freeze``. Each step
that reads calibration data runs the model once (or, for GPTQ, layer group after layer group), so
unit ``k`` sees, in each such step, the outputs of units ``0..k-1`` *in the state that step saw them
in the in-memory run*:

* a single-pass step (AWQ's and SmoothQuant's statistics, ``lb.calibrate``'s observers) runs on the
  whole model as it is before the step: its input stream is the units' outputs computed just
  before the step is applied to them;
* GPTQ is sequential (Frantar et al. 2022): a layer's Hessian comes from the outputs of the layers
  already quantized, so its stream is each unit's output computed after GPTQ, with the quantized
  layers running their on-grid master weights as :func:`lowbit.gptq` does.

So every data step keeps one *stream* of activations (the units' outputs it will feed to the next
unit), and a unit's processing returns the next value of each stream. The algorithms themselves are
the in-memory ones, called on the unit's :class:`~lowbit.stream.skeleton.Shell`: same calibration,
same arithmetic, same codes (tests/stream compares them with ``Recipe.apply``).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from ..batches import call
from ..gptq import gptq
from ..gptq.driver import without_restore_copy
from ..modules import QuantEmbedding, QuantLayer, is_linear_like
from ..quantize import calibrate, freeze, quantize
from ..recipes import Recipe
from ..transforms.pipeline import _parse

__all__ = ["Step", "plan", "process", "FLOAT_STEPS", "QUANTIZED_STEPS"]

FLOAT_STEPS = ("awq", "smooth_quant")
QUANTIZED_STEPS = ("gptq", "gguf_grid")


@dataclass
class Step:
    kind: str                     # "float" | "quantize" | "calibrate" | "gptq" | "nodata"
    name: str = ""
    options: dict = field(default_factory=dict)
    fn: object = None

    @property
    def stream(self) -> str | None:
        """The activation stream this step reads, or None."""
        return None if self.kind in ("quantize", "nodata") else self.name


def plan(recipe: Recipe) -> list[Step]:
    """The steps of ``recipe`` (``ValueError`` for a transform streaming cannot run per unit)."""
    steps, quantized = [], []
    for i, (t, options) in enumerate(_parse(list(recipe.transforms))):
        if t.stage == "float":
            if t.name not in FLOAT_STEPS:
                raise ValueError(f"recipe {recipe.name!r}: transform {t.name!r} is not supported by streaming "
                                 f"quantization (supported: {FLOAT_STEPS + QUANTIZED_STEPS}); use lb.recipes.get("
                                 f"{recipe.name!r}).apply(model, batches) in memory")
            steps.append(Step("float", f"{t.name}#{i}", dict(options), t.fn))
        else:
            if t.name not in QUANTIZED_STEPS:
                raise ValueError(f"recipe {recipe.name!r}: transform {t.name!r} is not supported by streaming "
                                 f"quantization (supported: {FLOAT_STEPS + QUANTIZED_STEPS}); use lb.recipes.get("
                                 f"{recipe.name!r}).apply(model, batches) in memory")
            kind = "gptq" if t.name == "gptq" else "nodata"
            quantized.append(Step(kind, f"{t.name}#{i}", dict(options), t.fn))
    steps.append(Step("quantize"))
    acts = recipe.activations
    if acts is not None and not acts.dynamic:
        steps.append(Step("calibrate", "calibrate"))
    return steps + quantized


def _local(patterns, names: list[str]):
    """The patterns of ``patterns`` that match a module of this unit (None if there are none)."""
    if patterns is None:
        return None
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    pats = [p for p in pats if any(fnmatch.fnmatchcase(n, p) for n in names)]
    return pats or None


def _has_linear(shell: nn.Module) -> bool:
    return any(is_linear_like(m) for m in shell.modules())


def _quantized(shell: nn.Module) -> bool:
    return any(isinstance(m, (QuantLayer, QuantEmbedding)) for m in shell.modules())


def _run(shell: nn.Module, batches, sink) -> list:
    """``shell`` on every batch (eval, no grad); each output goes through ``sink`` (spill or keep)."""
    out = []
    was = shell.training
    shell.eval()
    try:
        with torch.no_grad():
            for b in batches:
                y = call(shell, b)
                out.append(sink(y[0] if isinstance(y, tuple) else y))
    finally:
        shell.train(was)
    return out


def _run_on_grid(shell: nn.Module, batches, sink) -> list:
    """As ``lb.gptq`` runs finished layers: their on-grid master weights, fake quantization off."""
    layers = [m for m in shell.modules() if isinstance(m, QuantLayer) and m.weight_quant.enabled]
    for m in layers:
        m.weight_quant.enabled = False
    try:
        return _run(shell, batches, sink)
    finally:
        for m in layers:
            m.weight_quant.enabled = True


def process(shell: nn.Module, steps: list[Step], recipe: Recipe, inputs: dict, sink, *, outputs: bool = True,
            exclude=None):
    """Apply ``steps`` to the unit ``shell`` (float, materialised) and freeze it.

    ``inputs[stream]`` are the unit's calibration batches of each stream; returns ``(shell,
    outputs)`` with ``outputs[stream]`` the unit's outputs in that stream (``{}`` when
    ``outputs=False``: the last unit). ``sink(stream, tensor) -> item`` stores one output (in memory or
    on disk).
    """
    names = [n for n, _ in shell.named_modules() if n]
    out: dict = {}
    opts = recipe.quantize_options()
    if exclude:
        opts["exclude"] = list(recipe.exclude) + list(exclude)
    opts["exclude"] = _local(opts.get("exclude"), names)
    for step in steps:
        batches = inputs.get(step.stream) if step.stream else None
        if step.kind == "float":
            if outputs:
                out[step.stream] = _run(shell, batches, lambda y, s=step.stream: sink(s, y))
            if _has_linear(shell):
                options = dict(step.options)
                for key in ("include", "exclude"):
                    if key in options:
                        options[key] = _local(options[key], names)
                shell = step.fn(shell, batches, **options)
        elif step.kind == "quantize":
            try:
                shell = quantize(shell, inplace=True, **opts)
            except ValueError as e:
                if "no layer was quantized" not in str(e):
                    raise
        elif step.kind == "calibrate":
            keep = (lambda y, s=step.stream: sink(s, y)) if outputs else (lambda y: None)
            if any(isinstance(m, QuantLayer) for m in shell.modules()):
                with calibrate(shell):   # the pass is the calibration (the last unit's outputs are dropped)
                    res = _run(shell, batches, keep)
            else:
                res = _run(shell, batches, keep) if outputs else None
            if outputs:
                out[step.stream] = res
        elif step.kind == "gptq":
            if any(isinstance(m, QuantLayer) and m.weight_quant.enabled for m in shell.modules()):
                with without_restore_copy():   # on failure the unit is dropped and redone from the shards
                    shell = step.fn(shell, batches, **step.options)
            if outputs:
                out[step.stream] = _run_on_grid(shell, batches, lambda y, s=step.stream: sink(s, y))
        else:   # a transform without data (the GGUF grid)
            if any(isinstance(m, QuantLayer) for m in shell.modules()):
                shell = step.fn(shell, None, **step.options)
    if _quantized(shell):
        freeze(shell)
    return shell, out
