"""Export a built-in model (``lowbit.zoo``) quantized with a named recipe, and check it with ONNX Runtime.

This is the work behind ``lowbit export``; it returns a JSON-able summary.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .. import recipes, zoo
from .onnx_export import export_onnx
from .runtime import compare_with_onnx

__all__ = ["export_builtin", "export_model", "BUILTIN_EXPORTS"]

log = logging.getLogger(__name__)

BUILTIN_EXPORTS = ("digits", "mnist1d", "minilm")


def _check_out(out: Path) -> None:
    if out.suffix != ".onnx":
        raise ValueError(f"out must end in .onnx, got {str(out)!r}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"out: directory {str(parent)!r} does not exist; create it first")


def export_builtin(model: str, recipe: str, out: str | Path, *, opset: int | None = None,
                   integer: bool = False) -> dict:
    """Quantize built-in ``model`` with ``recipe``, write it to ``out`` (.onnx), compare ONNX Runtime with lowbit."""
    if model not in BUILTIN_EXPORTS:
        raise ValueError(f"model must be one of {BUILTIN_EXPORTS}, got {model!r}")
    r = recipes.get(recipe)
    out = Path(out)
    _check_out(out)
    if model == "minilm":
        st = zoo.load_minilm()
        float_model = zoo.transformer_of(st)
        texts = zoo.sentences()
        batches = zoo.tokenized_batches(st, texts[:128], batch_size=32)
        check = zoo.tokenized_batches(st, texts[256:320], batch_size=64)[0]
    else:
        float_model, dataset = zoo.get(model)
        batches = zoo.calibration_batches(dataset)
        check = dataset.x_test
    return export_model(model, float_model, r, batches, check, out, opset=opset, integer=integer)


def export_model(model: str, float_model: torch.nn.Module, r: recipes.Recipe, batches: list, check, out: str | Path,
                 *, opset: int | None = None, integer: bool = False) -> dict:
    """Quantize ``float_model`` with recipe ``r`` on ``batches``, export it to ``out`` (``batches[0]`` is
    the example input), and compare ONNX Runtime with lowbit (and lowbit with float) on ``check``
    (one model input); ``model`` names it in the summary."""
    out = Path(out)
    _check_out(out)
    t0 = time.perf_counter()
    log.info("quantizing %s with %s", model, r.name)
    q = r.apply(float_model, batches)
    t1 = time.perf_counter()
    log.info("exporting to %s", out)
    info = export_onnx(q, batches[0], out, opset=opset, integer=integer)
    t2 = time.perf_counter()
    agree = compare_with_onnx(q, out, check)
    with torch.no_grad():
        got = q(**check) if isinstance(check, dict) else q(check)
        ref = float_model(**check) if isinstance(check, dict) else float_model(check)
    got = got if isinstance(got, torch.Tensor) else got[0]
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    quant_err = float((got - ref).norm() / ref.norm())
    row = {"model": model, "recipe": r.name, "layers": len(info.layers), "int4_layers": len(info.int4),
           "integer_layers": len(info.integer), "size_bytes": info.size_bytes,
           "onnx_vs_lowbit_rel_l2": agree["rel_l2"], "lowbit_vs_float_rel_l2": quant_err}
    return {**info.as_dict(), "model": model, "recipe": r.name,
            "check": {**agree, "lowbit_vs_float_rel_l2": quant_err},
            "seconds": {"quantize": t1 - t0, "export": t2 - t1}, "results": [row]}
