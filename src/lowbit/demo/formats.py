"""``lowbit demo --formats``: number formats side by side on a built-in CNN, at their stored bits per weight.

Every row quantizes the weights only (activations stay float, so the row measures the weight
format), with round to nearest (``rtn``) and with GPTQ (``gptq``, act_order; Frantar et al. 2022)
on calibration batches of the train split, then freezes and measures on the test split like
``lowbit demo`` (accuracy, top-1 agreement, ``KL(float || quantized)``).

``bits/weight`` is what the weights cost stored, scales and zero points included
(:func:`lowbit.analysis.mixed_specs.model_bits_per_weight`): codes plus, per scale, a float16
scale for the free-scale formats (int, FP8, NF4; what GGUF and GPTQ checkpoints store) and an
8-bit zero point for asymmetric int grids; the MX formats' E8M0 and NVFP4's E4M3 block scales
(plus one float32 per tensor) at their own widths. The layers of a small CNN are short, so a
group of 128 covers whole rows (int4 g128 is then per channel) and NF4/MX blocks may be partial.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

from ..analysis.mixed_specs import model_bits_per_weight
from ..quantize import freeze
from ..recipes import Recipe
from ..spec import PerChannel, PerGroup, QuantSpec
from .builtin import builtin
from .metrics import torch_threads

__all__ = ["FORMAT_ROWS", "ALGORITHMS", "format_specs", "FormatRow", "FormatsResult", "run_formats"]

log = logging.getLogger("lowbit.demo")

# (label, QuantSpec keyword arguments); a format this installation lacks is skipped (and named)
FORMAT_ROWS: tuple[tuple[str, dict], ...] = (
    ("int8", {"bits": 8, "granularity": PerChannel(0)}),
    ("fp8_e4m3", {"format": "fp8_e4m3", "granularity": PerChannel(0)}),
    ("fp8_e5m2", {"format": "fp8_e5m2", "granularity": PerChannel(0)}),
    ("mxfp8", {"format": "mxfp8"}),
    ("int4 g32", {"bits": 4, "granularity": PerGroup(32)}),
    ("int4 g128", {"bits": 4, "symmetric": False, "granularity": PerGroup(128)}),
    ("nf4", {"format": "nf4"}),
    ("mxfp4", {"format": "mxfp4"}),
    ("nvfp4", {"format": "nvfp4"}),
)
ALGORITHMS = {"rtn": (), "gptq": (("gptq", {"act_order": True}),)}


def format_specs(labels: Sequence[str] | None = None) -> tuple[list[tuple[str, QuantSpec]], dict[str, str]]:
    """``([(label, spec)], {label: why skipped})`` for :data:`FORMAT_ROWS` (or the ``labels`` among them)."""
    known = dict(FORMAT_ROWS)
    if labels is not None:
        bad = [x for x in labels if x not in known]
        if bad:
            raise ValueError(f"formats {bad} are not in the table; choose from {list(known)}")
    out, skipped = [], {}
    for label, kw in FORMAT_ROWS:
        if labels is not None and label not in labels:
            continue
        try:
            out.append((label, QuantSpec(**kw)))
        except (TypeError, ValueError) as e:
            skipped[label] = str(e)
    return out, skipped


@dataclass(frozen=True)
class FormatRow:
    format: str
    algorithm: str
    bits_per_weight: float
    accuracy: float
    delta_points: float
    agreement: float
    kl: float
    seconds: float


@dataclass
class FormatsResult:
    model: str
    dataset: str
    float_accuracy: float
    rows: list[FormatRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"model": self.model, "dataset": self.dataset, "float": {"accuracy": self.float_accuracy},
                "formats": [asdict(r) for r in self.rows], "skipped": dict(self.skipped)}


def run_formats(model: str = "mnist1d", formats: Sequence[str] | None = None,
                algorithms: Sequence[str] = ("rtn", "gptq"), calibration_batches: int = 8,
                threads: int | None = 1) -> FormatsResult:
    """The format table on built-in model ``model`` (see the module docstring)."""
    if isinstance(algorithms, str) or not algorithms or any(a not in ALGORITHMS for a in algorithms):
        raise ValueError(f"algorithms must be a non-empty list from {list(ALGORITHMS)}, got {algorithms!r}")
    specs, skipped = format_specs(formats)
    entry = builtin(model)
    with torch_threads(threads):
        float_model, data = entry.load()
        calib = entry.calibration(data, calibration_batches)
        base = entry.evaluate(float_model, float_model, data)
        if "accuracy" not in base:
            raise ValueError(f"the format table needs a classifier; built-in model {model!r} reports {sorted(base)}")
        result = FormatsResult(model=type(float_model).__name__, dataset=entry.dataset,
                               float_accuracy=base["accuracy"], skipped=skipped)
        for label, spec in specs:
            for alg in algorithms:
                t0 = time.perf_counter()
                rec = Recipe(f"{label} {alg}", "", spec, transforms=ALGORITHMS[alg])
                q = rec.apply(float_model, calib, freeze=False)
                bpw = model_bits_per_weight(q)
                freeze(q)
                m = entry.evaluate(float_model, q, data)
                row = FormatRow(format=label, algorithm=alg, bits_per_weight=bpw, accuracy=m["accuracy"],
                                delta_points=100 * (m["accuracy"] - result.float_accuracy),
                                agreement=m["agreement"], kl=m["kl"], seconds=time.perf_counter() - t0)
                result.rows.append(row)
                log.info("%-10s %-5s %.2f bits/weight: accuracy %.2f%% (%+.2f), agree %.1f%%, KL %.2e", label, alg,
                         bpw, 100 * row.accuracy, row.delta_points, 100 * row.agreement, row.kl)
    return result
