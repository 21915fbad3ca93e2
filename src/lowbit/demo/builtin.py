"""Built-in models by name, one handler per kind: what ``lowbit demo`` and ``lowbit quantize
--model NAME`` load, calibrate on and evaluate with.

A :class:`BuiltinModel` says how to get ``(float model, data)``, how to draw calibration batches
from the data and how to measure a quantized copy against the float model. The CNNs of
:mod:`lowbit.zoo` (``digits``, ``mnist1d``) are registered here; other kinds join with
:func:`register_builtin` (e.g. ``minilm``, whose metrics are embedding agreement, not accuracy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .. import zoo
from .metrics import fidelity, logits_of

__all__ = ["BuiltinModel", "BUILTIN_MODELS", "register_builtin", "builtin", "classifier_metrics"]


@dataclass(frozen=True)
class BuiltinModel:
    """A named model with its data.

    Attributes:
        load: ``() -> (float model in eval mode, data)``.
        calibration: ``(data, num_batches) -> list of model inputs`` (never the test split).
        evaluate: ``(float model, quantized or float model, data) -> dict`` of JSON-able metrics
            (the CNNs give ``accuracy``, ``kl``, ``agreement``); called with the float model twice
            for the float row.
        dataset: name of the data set, for reports.
    """

    name: str
    dataset: str
    load: Callable[[], tuple[nn.Module, Any]]
    calibration: Callable[[Any, int], list]
    evaluate: Callable[[nn.Module, nn.Module, Any], dict]
    description: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {}


def register_builtin(model: BuiltinModel) -> BuiltinModel:
    """Make ``model`` available by ``model.name`` to the demo and to ``lowbit quantize --model``."""
    if not isinstance(model, BuiltinModel):
        raise TypeError(f"model must be a lowbit.demo.BuiltinModel, got {type(model).__name__}")
    BUILTIN_MODELS[model.name] = model
    return model


def builtin(name: str) -> BuiltinModel:
    """The built-in model called ``name``."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"model must be one of {sorted(BUILTIN_MODELS)} (or package.module:factory with a "
                         f"state dict), got {name!r}")
    return BUILTIN_MODELS[name]


def classifier_metrics(float_model: nn.Module, model: nn.Module, data: zoo.Dataset) -> dict:
    """Accuracy on the test split, and KL / top-1 agreement against ``float_model``."""
    zf = logits_of(float_model, data.x_test)
    zq = zf if model is float_model else logits_of(model, data.x_test)
    f = fidelity(zf, zq, data.y_test)
    return {"accuracy": f.accuracy, "float_accuracy": f.float_accuracy, "kl": f.kl, "agreement": f.agreement,
            "samples": f.samples}


def _zoo_cnn(name: str) -> BuiltinModel:
    return BuiltinModel(
        name=name, dataset=name, load=lambda: zoo.get(name),
        calibration=lambda data, n: zoo.calibration_batches(data, num_batches=n),
        evaluate=classifier_metrics,
        description=f"the built-in {name} CNN (lowbit.zoo), trained once and cached")


for _name in zoo.MODELS:
    register_builtin(_zoo_cnn(_name))
