"""``lowbit demo``: one built-in model, a table of recipes, each measured against the float model.

For each recipe: quantize a copy of the float model, calibrate it on batches of the train split,
freeze it, then measure on the test split (see :mod:`lowbit.demo.metrics`): accuracy and its change
in points, top-1 agreement with the float model, ``KL(float || quantized)`` of the predictions,
and the size of the checkpoint ``lb.save`` writes next to the float file. Progress is logged (one
line per recipe) on the ``lowbit.demo`` logger.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

from .. import recipes as _recipes
from .builtin import builtin
from .metrics import checkpoint_bytes, float_checkpoint_bytes, torch_threads

__all__ = ["DEMO_RECIPES", "DemoRow", "DemoResult", "run_demo", "DEFAULT_MODEL"]

log = logging.getLogger("lowbit.demo")

DEFAULT_MODEL = "mnist1d"
DEMO_RECIPES = ("w8a8", "w8a8-mse", "w8a8-entropy", "w4a8", "w4g128", "w4g32", "w2a8")


@dataclass(frozen=True)
class DemoRow:
    """One recipe's measurements (``delta_points`` = accuracy change in percentage points;
    ``ratio`` = float file size / checkpoint size; ``seconds`` / ``cpu_seconds`` to quantize,
    calibrate and freeze)."""

    recipe: str
    accuracy: float
    size_bytes: int
    kl: float
    agreement: float
    delta_points: float
    ratio: float
    seconds: float
    cpu_seconds: float
    description: str


@dataclass
class DemoResult:
    dataset: str
    model: str
    float_accuracy: float
    float_size_bytes: int
    results: list[DemoRow] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def as_dict(self) -> dict:
        """``{"dataset", "model", "float": {"accuracy", "size_bytes"}, "results": [row, ...]}``."""
        return {"dataset": self.dataset, "model": self.model,
                "float": {"accuracy": self.float_accuracy, "size_bytes": self.float_size_bytes},
                "results": [asdict(r) for r in self.results]}


def run_demo(model: str = DEFAULT_MODEL, recipes: Sequence[str] = DEMO_RECIPES,
             calibration_batches: int = 8, threads: int | None = 1) -> DemoResult:
    """Run the recipe table on built-in model ``model`` (see the module docstring).

    ``threads``: torch threads for the run (restored afterwards). One by default: the built-in
    models are far too small to gain from more, and extra threads on busy cores cost several times
    the time; ``None`` leaves torch's setting.
    """
    with torch_threads(threads):
        return _run(model, recipes, calibration_batches)


def _run(model: str, recipes: Sequence[str], calibration_batches: int) -> DemoResult:
    if isinstance(recipes, str):
        recipes = [recipes]
    chosen = [_recipes.get(r) for r in recipes]        # fail on a bad name before any work
    if not chosen:
        raise ValueError("recipes is empty: name at least one recipe (see lowbit.recipes.names())")
    entry = builtin(model)
    t0, c0 = time.perf_counter(), time.process_time()
    float_model, data = entry.load()
    calib = entry.calibration(data, calibration_batches)
    base = entry.evaluate(float_model, float_model, data)
    if "accuracy" not in base:
        raise ValueError(f"the demo table needs a classifier; built-in model {model!r} reports {sorted(base)}")
    result = DemoResult(dataset=entry.dataset, model=type(float_model).__name__,
                        float_accuracy=base["accuracy"], float_size_bytes=float_checkpoint_bytes(float_model))
    log.info("%s on %s: float accuracy %.2f%%, %d bytes (loaded in %.1fs)", result.model, result.dataset,
             100 * result.float_accuracy, result.float_size_bytes, time.perf_counter() - t0)
    for k, recipe in enumerate(chosen, 1):
        r0, rc0 = time.perf_counter(), time.process_time()
        q = recipe.apply(float_model, calib)
        seconds, cpu = time.perf_counter() - r0, time.process_time() - rc0
        m = entry.evaluate(float_model, q, data)
        size = checkpoint_bytes(q)
        row = DemoRow(recipe=recipe.name, accuracy=m["accuracy"], size_bytes=size, kl=m["kl"],
                      agreement=m["agreement"], delta_points=100 * (m["accuracy"] - result.float_accuracy),
                      ratio=result.float_size_bytes / size, seconds=seconds, cpu_seconds=cpu,
                      description=recipe.description)
        result.results.append(row)
        log.info("[%d/%d] %-13s accuracy %.2f%% (%+.2f points), KL %.2e, %d bytes (%.1fx smaller), %.2fs",
                 k, len(chosen), recipe.name, 100 * row.accuracy, row.delta_points, row.kl, size, row.ratio, seconds)
    result.seconds, result.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return result
