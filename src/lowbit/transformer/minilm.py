"""Quantize all-MiniLM-L6-v2 with a named recipe, evaluate it against the float model, time both.

What ``lowbit quantize --model minilm --recipe NAME [--sentences FILE] --json`` runs
(:func:`quantize_minilm`):

1. the recipe is looked up for the ``"transformer"`` family (``w8a8`` -> its transformer variant,
   see :mod:`lowbit.recipes`; the JSON names both);
2. calibration sentences: by default ``calibration_size`` built-in sentences that are *not* among
   the built-in evaluation sentences (the corpus has about 1150; evaluation uses 512 spread over
   it, calibration every other one of the rest); with ``calibration="file"``, every 4th sentence
   of the user's file (at most ``calibration_size``), which is then left out of the evaluation;
3. the transformer is quantized, calibrated and frozen (wall and CPU seconds reported);
4. the float and the quantized model encode the evaluation sentences: per-sentence cosine to the
   float embeddings (mean, min), Spearman of the pairwise similarities, and the encode time of
   each (best of ``repeats``, wall and CPU). The quantized model runs on ``backend``: a name of
   :mod:`lowbit.transformer.backends`, ``"auto"`` (the first that works in the measured order
   :data:`~lowbit.transformer.backends.AUTO_ORDER`) or ``"fastest"`` (every candidate built and
   timed on 64 sentences). The JSON names the backend that ran (and the trial times, or why the
   preferred ones could not run).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from .. import recipes as _recipes
from .. import zoo
from . import backends as _backends
from .sentence import model_bytes, quantize_sentence_model, weight_bytes, with_transformer

__all__ = ["quantize_minilm", "read_sentences", "split_sentences", "timed_encode", "FAMILY", "MIN_SENTENCES",
           "CALIBRATION_SIZE"]

log = logging.getLogger(__name__)

FAMILY = "transformer"
MIN_SENTENCES = 4          # Spearman of pairwise similarities needs a few sentences
CALIBRATION_SIZE = 512   # GPTQ/AWQ gain from more (128: 0.9898, 512: 0.9920 cosine at 4 bits); 20-30 s
CALIBRATION_CHOICES = ("builtin", "file")
_AUTO = ("auto", "fastest")


def read_sentences(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file (one sentence per line), stripped."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"sentences file must be a path, got {type(path).__name__}")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"sentences file {str(p)!r} does not exist (or is not a file); give a text file with "
                         "one sentence per line")
    raw = p.read_bytes()
    if b"\x00" in raw:
        raise ValueError(f"sentences file {str(p)!r} is binary; give a UTF-8 text file with one sentence per line")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"sentences file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start}); "
                         "save it as UTF-8, one sentence per line") from None
    out = [line.strip() for line in text.splitlines() if line.strip()]
    if len(out) < MIN_SENTENCES:
        raise ValueError(f"sentences file {str(p)!r} has {len(out)} non-empty lines; give at least "
                         f"{MIN_SENTENCES} sentences, one per line")
    return out


def split_sentences(sentences: list[str] | None = None, calibration: str = "builtin",
                    calibration_size: int = CALIBRATION_SIZE) -> tuple[list[str], list[str]]:
    """``(calibration, evaluation)`` sentences (see the module docstring)."""
    if calibration not in CALIBRATION_CHOICES:
        raise ValueError(f"calibration must be one of {CALIBRATION_CHOICES}, got {calibration!r}")
    if isinstance(calibration_size, bool) or not isinstance(calibration_size, int) or calibration_size < 1:
        raise ValueError(f"calibration_size must be an int >= 1, got {calibration_size!r}")
    if calibration == "file":
        if sentences is None:
            raise ValueError("calibration='file' needs the user's sentences (a --sentences file)")
        calib = sentences[::4][:calibration_size]
        held = set(range(0, 4 * len(calib), 4))
        evals = [s for i, s in enumerate(sentences) if i not in held]
        if len(evals) < MIN_SENTENCES:
            raise ValueError(f"after holding out {len(calib)} sentences for calibration, {len(evals)} remain for the "
                             f"evaluation; give at least {MIN_SENTENCES + len(calib)} sentences")
        return calib, evals
    evals = zoo.sentences() if sentences is None else list(sentences)
    taken = set(zoo.sentences()) | set(evals)
    rest = [s for s in zoo.all_sentences() if s not in taken]
    step = max(1, len(rest) // calibration_size)
    return rest[::step][:calibration_size], evals


def timed_encode(model: nn.Module, sentences: list[str], *, repeats: int = 1, batch_size: int = 64,
                 threads: int | None = None) -> tuple[torch.Tensor, float, float]:
    """``(embeddings, wall seconds, CPU seconds)`` of the fastest of ``repeats`` encodes (after a warm-up
    on 8 sentences), on ``threads`` torch threads (None: the current number)."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        zoo.encode(model, sentences[:8], batch_size)
        best = (float("inf"), float("inf"))
        emb = None
        for _ in range(max(1, repeats)):
            t0, c0 = time.perf_counter(), time.process_time()
            emb = zoo.encode(model, sentences, batch_size)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best = min(best, (wall, cpu))
    finally:
        torch.set_num_threads(old)
    return emb, best[0], best[1]


def _check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")


def quantize_minilm(recipe: str = "w8a8", sentences: list[str] | None = None, *, calibration: str = "builtin",
                    calibration_size: int = CALIBRATION_SIZE, backend: str = "auto", threads: int | None = None,
                    repeats: int = 1, model: nn.Module | None = None, keep_model: bool = False) -> dict:
    """Quantize MiniLM with ``recipe`` and measure it (see the module docstring); a JSON-able dict.

    ``model``: the float SentenceTransformer (default: ``zoo.load_minilm()``); it is not modified.
    ``keep_model``: also return the frozen quantized transformer under ``"quantized_model"``.
    """
    resolved = _recipes.resolve(recipe, FAMILY)          # bad names fail before any work
    if backend not in _AUTO and backend not in _backends.BACKENDS:
        raise ValueError(f"backend must be 'auto', 'fastest' or one of {list(_backends.BACKENDS)}, got {backend!r}")
    if backend not in _AUTO and backend not in _backends.available():
        raise ValueError(f"backend {backend!r} is not available in this installation; available: "
                         f"{_backends.available()}")
    _check_threads(threads)
    calib, evals = split_sentences(sentences, calibration, calibration_size)
    st = zoo.load_minilm() if model is None else model
    rec = _recipes.get(resolved)

    ref, f_wall, f_cpu = timed_encode(st, evals, repeats=repeats, threads=threads)
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        st_q = quantize_sentence_model(st, rec, calib if rec.needs_calibration else None)
        q = zoo.transformer_of(st_q)
        trial = zoo.tokenized_batches(st, evals[:64], batch_size=32)
        failed, trials = {}, {}
        if backend == "auto":
            chosen, runner, failed = _backends.preferred(q, trial[0], threads)
        elif backend == "fastest":
            chosen, runner, trials = _backends.fastest(q, trial, _backends.candidates(), threads)
        else:
            chosen, runner = backend, _backends.build(backend, q, trial[0], threads)
    finally:
        torch.set_num_threads(old)
    runnable = with_transformer(st_q, runner) if runner is not q else st_q
    emb, q_wall, q_cpu = timed_encode(runnable, evals, repeats=repeats, threads=threads)
    agree = zoo.compare_embeddings(ref, emb)
    wb = weight_bytes(q)
    info = q.lowbit_info
    result = {
        "model": "minilm", "recipe": recipe, "resolved_recipe": resolved, "description": rec.description,
        "backend": chosen, "backend_description": _backends.BACKENDS[chosen].description,
        "backend_trial_seconds": trials, "backends_failed": failed, "threads": threads or torch.get_num_threads(),
        "sentences": len(evals), "calibration_sentences": len(calib) if rec.needs_calibration else 0,
        "calibration_source": calibration if rec.needs_calibration else None,
        "quantized_layers": len(info.quantized), "float_modules": sorted(info.skipped),
        "quantized_embeddings": list(info.quantized_embeddings),
        "float": {"seconds": f_wall, "cpu_seconds": f_cpu, "size_bytes": model_bytes(zoo.transformer_of(st))},
        "quantized": {"seconds": q_wall, "cpu_seconds": q_cpu, "speedup": f_wall / q_wall,
                      "cosine_mean": agree.cosine_mean, "cosine_min": agree.cosine_min, "spearman": agree.spearman,
                      "size_bytes": model_bytes(q), "weight_bytes": wb.quantized, "float_weight_bytes": wb.float32,
                      "quantize_seconds": st_q.lowbit_seconds["wall"],
                      "quantize_cpu_seconds": st_q.lowbit_seconds["cpu"]},
    }
    if keep_model:
        result["quantized_model"] = q
    return result
