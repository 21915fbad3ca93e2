"""Execution backends: what runs a frozen quantized transformer when it encodes sentences.

A backend turns the frozen quantized transformer ``q`` (from ``lb.freeze``) into a module called
exactly like it (``module(**batch)`` -> the same outputs), which :func:`with_transformer` puts
back into the ``SentenceTransformer``. Built in:

* ``"torch"``: lowbit's own modules as they are: float GEMMs on dequantized weights, activations
  fake-quantized. The reference semantics; slower than float (the quantize/dequantize steps are
  extra work), never faster.
* ``"integer"``: :func:`lowbit.integer.to_integer`: exact integer GEMMs and requantization. A
  reference path for checking integer arithmetic, not built for speed.
* ``"onnxruntime"``: the QDQ ONNX graph of :mod:`lowbit.export`, run by ONNX Runtime (its integer
  kernels). Available when ``lowbit.export`` provides ``ort_module``.
* ``"fast-ort"`` / ``"fast-torch"``: :func:`lowbit.integer.fast`: the graph exported with
  ``MatMulInteger`` run by ONNX Runtime, or torch's int8 GEMM (``_int_mm``) on lowbit's codes with
  other layers' weights dequantized once. Available when ``lowbit.integer`` provides ``fast``.

Other fast paths join with :func:`register_backend`. :func:`preferred` builds the first available
backend of :data:`AUTO_ORDER` that accepts the model (``lowbit quantize --backend auto``): the
order measured fastest on MiniLM (``benchmarks/bench_transformer.py``, 2 threads: ONNX Runtime ran
static W8A8 ~3x and 4-bit weights ~2.3x faster than float torch on either graph, and per-token
dynamic W8A8 2.9x on the ``MatMulInteger`` graph against 1.8x on the QDQ one; lowbit's torch
modules are slower than float). :func:`fastest` instead builds and times every candidate on a few batches
(``--backend fastest``; exporting twice costs tens of seconds); both leave out reference paths
(``auto=False``: ``"integer"``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .. import batches as _batches

__all__ = ["Backend", "BACKENDS", "AUTO_ORDER", "register_backend", "available", "candidates", "build", "preferred",
           "fastest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """``build(q, example_batch, threads) -> module`` called like ``q``; ``available()`` says if it can
    run here; ``auto``: whether :func:`fastest` tries it by default (reference paths do not)."""

    name: str
    description: str
    build: Callable[[nn.Module, object, int | None], nn.Module]
    available: Callable[[], bool] = lambda: True
    auto: bool = True


BACKENDS: dict[str, Backend] = {}
AUTO_ORDER = ("fast-ort", "onnxruntime", "fast-torch", "torch")   # fastest first, as measured on MiniLM


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend under ``backend.name``."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a lowbit.transformer.Backend, got {type(backend).__name__}")
    BACKENDS[backend.name] = backend
    return backend


def available() -> list[str]:
    """Names of the backends that can run on this installation."""
    out = []
    for name, b in BACKENDS.items():
        try:
            if b.available():
                out.append(name)
        except ImportError:   # an optional dependency that is not installed
            continue
    return out


def candidates() -> list[str]:
    """The available backends :func:`fastest` tries by default."""
    return [n for n in available() if BACKENDS[n].auto]


def build(name: str, q: nn.Module, example_batch, threads: int | None = None) -> nn.Module:
    """The module backend ``name`` runs ``q`` with (``example_batch``: one input batch, for exporters)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    if name not in available():
        raise ValueError(f"backend {name!r} is not available in this installation ({BACKENDS[name].description}); "
                         f"available: {available()}")
    return BACKENDS[name].build(q, example_batch, threads)


_BUILD_ERRORS = (ValueError, TypeError, RuntimeError, ImportError, NotImplementedError)


def preferred(q: nn.Module, example_batch, threads: int | None = None,
              order: Sequence[str] = AUTO_ORDER) -> tuple[str, nn.Module, dict[str, str]]:
    """``(name, module, why the ones before it failed)`` for the first backend of ``order`` that is
    available and builds for ``q`` (then runs ``example_batch``)."""
    failed: dict[str, str] = {}
    for name in order:
        if name not in BACKENDS or name not in available():
            continue
        try:
            module = build(name, q, example_batch, threads)
            _run_all(module, [example_batch])
        except _BUILD_ERRORS as e:
            log.warning("backend %s cannot run this model: %s", name, e)
            failed[name] = f"{type(e).__name__}: {e}"
            continue
        return name, module, failed
    raise ValueError(f"none of the backends {list(order)} could run the model: {failed}")


def _run_all(module: nn.Module, batches: Sequence) -> None:
    with torch.no_grad():
        for b in batches:
            _batches.call(module, b)


def fastest(q: nn.Module, batches: Sequence, names: Sequence[str] | None = None, threads: int | None = None,
            repeats: int = 2) -> tuple[str, nn.Module, dict[str, float]]:
    """Build each backend in ``names`` (default: all available), time it on ``batches`` (best of
    ``repeats`` after one warm-up pass) and return ``(name, module, seconds by name)`` of the fastest.

    A backend that fails to build or run is left out (logged, and its entry is ``None``).
    """
    names = list(names) if names is not None else candidates()
    if not names:
        raise ValueError("no execution backend is available")
    batches = _batches.as_batches(batches)
    built: dict[str, nn.Module] = {}
    seconds: dict[str, float | None] = {}
    for name in names:
        try:
            module = build(name, q, batches[0], threads)
            _run_all(module, batches[:1])
            best = float("inf")
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                _run_all(module, batches)
                best = min(best, time.perf_counter() - t0)
        except _BUILD_ERRORS as e:
            log.warning("backend %s cannot run this model: %s", name, e)
            seconds[name] = None
            continue
        built[name], seconds[name] = module, best
    if not built:
        raise ValueError(f"none of the backends {names} could run the model: {seconds}")
    winner = min(built, key=lambda n: seconds[n])
    return winner, built[winner], seconds


def _torch(q: nn.Module, example, threads):
    return q


def _integer(q: nn.Module, example, threads):
    from ..integer import to_integer

    return to_integer(q)


def _ort_available() -> bool:
    from .. import export   # noqa: F401  (ImportError: not available)

    return hasattr(export, "ort_module")


def _ort(q: nn.Module, example, threads):
    from ..export import ort_module

    return ort_module(q, example, threads=threads)


def _fast_available() -> bool:
    from ..integer import fast   # noqa: F401  (ImportError: not available)

    return True


def _fast(kind: str):
    def build(q: nn.Module, example, threads):
        from ..integer import fast

        if kind == "ort":
            return fast(q, backend="ort", example_inputs=example, threads=threads)
        return fast(q, backend="torch")
    return build


register_backend(Backend("torch", "lowbit's torch modules: float GEMMs on dequantized weights (fake-quant reference)",
                         _torch))
register_backend(Backend("integer", "lowbit.integer: exact integer GEMMs and requantization (reference, not fast)",
                         _integer, auto=False))
register_backend(Backend("onnxruntime", "QDQ ONNX graph (lowbit.export) run by ONNX Runtime's integer kernels",
                         _ort, _ort_available))
register_backend(Backend("fast-ort", "lowbit.integer.fast: MatMulInteger ONNX graph run by ONNX Runtime",
                         _fast("ort"), _fast_available))
register_backend(Backend("fast-torch", "lowbit.integer.fast: torch int8 GEMMs (_int_mm), other weights dequantized once",
                         _fast("torch"), _fast_available))
