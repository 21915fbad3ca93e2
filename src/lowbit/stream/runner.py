"""``lb.quantize_checkpoint``: a Hugging Face checkpoint quantized unit by unit at bounded memory.

The loop (see :mod:`lowbit.stream` for the whole picture)::

    skeleton on meta -> record each decoder layer's keyword arguments (masks, rotary tables)
    for unit in [head, layer 0, ..., layer L-1, tail]:
        materialise its float weights from the shards (plain reads)
        run the recipe's steps on it with each stream's cached inputs (lowbit.stream.stages)
        freeze; write its shard atomically; save the streams' new values; mark it done; free it
    write the index (the checkpoint is complete)

Peak memory is about one unit's float weights, their quantized state and the algorithm's
statistics (GPTQ: one ``d x d`` Hessian per layer of a group), plus the activation streams (or
one batch of them when spilled), whatever the number of layers.
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Iterable

import torch

from ..recipes import Recipe
from .acts import Acts, LayerBatches
from .output import Output
from .shards import ShardReader
from .skeleton import block_shell, build_skeleton, head_shell, recorded, tail_shell, unit_tensor_names
from .stages import plan, process

__all__ = ["quantize_checkpoint"]

log = logging.getLogger(__name__)
_KILL = "_LOWBIT_STREAM_KILL"   # tests only: "unit:phase" -> SIGKILL this process there (phase: written | done)


def _trim() -> None:
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:   # pragma: no cover - psutil ships with the test extra
        return 0


def _peak_rss() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024 if sys.platform.startswith("linux") else kb


def _calibration(calibration, vocab: int) -> list[torch.Tensor]:
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise ValueError(f"calibration must be token ids of shape [sequences, tokens] (or a list of [batch, "
                             f"tokens] tensors), got shape {tuple(calibration.shape)}")
        batches = list(calibration.split(1))
    else:
        try:
            batches = list(calibration)
        except TypeError:
            raise TypeError(f"calibration must be a tensor of token ids or an iterable of them, got "
                            f"{type(calibration).__name__}") from None
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.is_floating_point() or b.is_complex():
            raise TypeError(f"calibration[{i}] must be an integer tensor of token ids [batch, tokens], got "
                            f"{type(b).__name__ if not isinstance(b, torch.Tensor) else f'{b.dtype} {tuple(b.shape)}'}")
        if b.numel() and (int(b.min()) < 0 or int(b.max()) >= vocab):
            raise ValueError(f"calibration[{i}] holds token ids outside [0, {vocab}) (the model's vocab_size); "
                             "tokenize with the checkpoint's own tokenizer")
    if not batches:
        raise ValueError("calibration is empty: pass token ids, e.g. 32 sequences of 256 tokens")
    return [b.to(torch.long) for b in batches]


def _key(recipe: Recipe, batches: list[torch.Tensor], fingerprint: str, exclude) -> str:
    from .. import __version__

    h = hashlib.sha256()
    h.update(repr((recipe, sorted(recipe.observer_options.items()), exclude, __version__, torch.__version__)).encode())
    h.update(fingerprint.encode())
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters())


def _check_budget(budget, model, arch, streams: int, batches: list[torch.Tensor], hidden: int, dtype) -> bool:
    """True when the activation streams must be spilled; ``ValueError`` when one unit cannot fit."""
    if budget is None:
        return False
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes (e.g. 4e9) or None, got {budget!r}")
    layers = model.get_submodule(arch.layers)
    head = _bytes(model) - _bytes(layers)
    unit = max(max((_bytes(b) for b in layers), default=0), head)
    widest = max((m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=0)
    item = torch.empty(0, dtype=dtype).element_size()
    one_batch = max((b.numel() for b in batches), default=0) * hidden * item
    # measured at 3B width (docs/streaming.md): the unit's float weights and what freeze builds from
    # them (~2x), GPTQ's float32 Hessian sum (4 bytes per d^2) and its two float64 factor buffers
    # (16), two activation streams in flight
    need = 2 * unit + 20 * widest * widest + 2 * max(streams, 1) * one_batch
    if budget < need:
        raise ValueError(f"memory_budget={budget:.3g} bytes is too small for one block of this model: a unit needs "
                         f"about {need / 2**30:.2f} GiB (float weights, their quantized copy, GPTQ's Hessian and "
                         "its factor, one "
                         f"batch of activations); pass memory_budget >= {need:.3g} or None")
    total = 2 * streams * sum(b.numel() for b in batches) * hidden * item
    return need + total > budget


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, recipe: Recipe, calibration=None, *,
                        memory_budget: float | None = None, resume: bool = True, exclude: Iterable[str] | None = None,
                        progress: bool = True) -> dict:
    """Quantize the Hugging Face checkpoint in ``src`` with ``recipe`` into ``dst``, one block at a time.

    Args:
        src: a model directory: ``config.json`` and ``*.safetensors`` shards (with or without
            ``model.safetensors.index.json``); read tensor by tensor, never whole.
        dst: output directory: one lowbit shard per unit, ``lowbit.index.json`` (written last),
            config and tokenizer files; ``lb.load(dst, model_on_meta)`` reads it.
        recipe: a :class:`lowbit.recipes.Recipe` (``lb.recipes.get("w4g128-gptq")``); the result
            equals ``recipe.apply(model, batches)`` on the in-memory model with the same batches.
        calibration: token ids: a ``[sequences, tokens]`` integer tensor (one batch per row) or an
            iterable of ``[batch, tokens]`` tensors; None for recipes that need no data.
        memory_budget: bytes the run may use for weights and activations; activations are spilled
            to ``dst/.lowbit-work`` when they would exceed it; ``ValueError`` if one block cannot fit.
        resume: continue an interrupted run in ``dst`` at its first unfinished block (False: start over).
        exclude: module-name patterns kept float, added to the recipe's.
        progress: a tqdm bar per block on stderr (elapsed, ETA, resident memory).

    Returns a summary dict (units, seconds, peak resident memory, ...). See :mod:`lowbit.stream`.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a lowbit.recipes.Recipe (lb.recipes.get(name)), got {type(recipe).__name__}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if not isinstance(src, (str, os.PathLike)) or not isinstance(dst, (str, os.PathLike)):
        raise TypeError("src and dst must be paths (str or os.PathLike)")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ValueError(f"src: {str(src)!r} is not a directory; pass a Hugging Face model directory")
    if dst.resolve() == src.resolve():
        raise ValueError("dst must differ from src (the output would overwrite the checkpoint's own files)")
    exclude = list(exclude) if exclude is not None else None
    steps = plan(recipe)
    streams = [s.stream for s in steps if s.stream]
    t0 = time.perf_counter()
    reader = ShardReader(src)
    config, model, arch = build_skeleton(src)
    batches = _calibration(calibration, int(config.vocab_size))
    if streams and not batches:
        raise ValueError(f"recipe {recipe.name!r} needs calibration data (token ids); pass calibration=")
    dtype = next(model.parameters()).dtype
    hidden = int(config.hidden_size)
    spill = _check_budget(memory_budget, model, arch, len(streams), batches, hidden, dtype)
    n_layers = len(model.get_submodule(arch.layers))
    units = ["head"] + [f"layer {i}" for i in range(n_layers)] + ["tail"]
    key = _key(recipe, batches, reader.fingerprint(), exclude)
    out = Output(dst, key, units, resume)
    if out.complete:
        return out_summary(out, dst, units, recipe, t0, resumed=len(units), spill=spill)
    start = len(out.done)
    if out.done != units[:start]:
        raise ValueError(f"dst: {str(dst / 'lowbit-progress.json')!r} lists units out of order; pass resume=False")

    kwargs: list = []
    state: dict[str, Acts] = {}
    if start > 0:
        kwargs = out.load_state("kwargs.pt")
        state = {s: _load_stream(out, start - 1, s, len(batches), spill) for s in streams}

    try:
        from tqdm.auto import tqdm
    except ImportError:   # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(units), initial=start, desc="lowbit quantize", unit="block", file=sys.stderr,
               disable=not progress or tqdm is None) if tqdm is not None else None
    kill = os.environ.get(_KILL, "")
    unit_seconds: dict[str, float] = {}
    for i in range(start, len(units)):
        unit = units[i]
        t_unit = time.perf_counter()
        if bar is not None:
            bar.set_postfix_str(f"{unit}, rss {_rss() / 2**30:.2f} GiB")
        if unit == "head":
            shell = head_shell(model, arch, config)
        elif unit == "tail":
            shell = tail_shell(model, arch)
        else:
            shell = block_shell(model, arch, i - 1)
        tensors = reader.read(unit_tensor_names(shell), dtype)
        shell.load_state_dict(tensors, strict=False, assign=True)
        del tensors
        if unit == "head" and batches:
            kwargs = []
            with torch.no_grad():
                for b in batches:
                    shell(b)
                    kwargs.append(recorded(shell)["layers"])
            out.save_state("kwargs.pt", kwargs)
        if unit == "head":
            inputs = {s: batches for s in streams}
        elif unit == "tail":
            inputs = {s: state[s] for s in streams}
        else:
            inputs = {s: LayerBatches(state[s], kwargs, i - 1) for s in streams}
        sink = _sink(out, i, spill)
        shell, new = process(shell, steps, recipe, inputs, sink, outputs=unit != "tail", exclude=exclude)
        out.write_unit(i, shell)
        del shell
        if kill == f"{i}:written":
            os.kill(os.getpid(), signal.SIGKILL)
        if unit != "tail":
            for s in streams:
                if not spill:
                    for b, t in enumerate(new[s]):
                        out.save_state(f"acts-{i}/{s}-{b:05d}.pt", t)
                new[s] = Acts(new[s])
        unit_seconds[unit] = round(time.perf_counter() - t_unit, 3)
        out.mark_done(unit, {"seconds": round(time.perf_counter() - t0, 3)})
        if kill == f"{i}:done":
            os.kill(os.getpid(), signal.SIGKILL)
        if i > 0:
            out.drop_state(f"acts-{i - 1}")
        state = new
        _trim()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    state = {}
    weight_map = {}
    from ..checkpoint.fileformat import read_header

    for i in range(len(units)):
        header, _ = read_header(dst / out.shard_name(i))
        weight_map.update({k: out.shard_name(i) for k in header if k != "__metadata__"})
    summary = out_summary(out, dst, units, recipe, t0, resumed=start, spill=spill)
    summary["unit_seconds"] = unit_seconds
    out.finish(src, type(model).__qualname__, weight_map, summary)
    return summary


def out_summary(out: Output, dst: Path, units: list[str], recipe: Recipe, t0: float, *, resumed: int,
                spill: bool) -> dict:
    return {"dst": str(dst), "recipe": recipe.name, "units": len(units), "blocks": len(units) - 2,
            "resumed_at": resumed, "seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_bytes": _peak_rss(), "spilled": spill}


def _sink(out: Output, i: int, spill: bool):
    if not spill:
        return lambda stream, t: t
    counter: dict = {}

    def sink(stream: str, t: torch.Tensor) -> Path:
        n = counter.get(stream, 0)
        counter[stream] = n + 1
        name = f"acts-{i}/{stream}-{n:05d}.pt"
        out.save_state(name, t)
        return out.work / name

    return sink


def _load_stream(out: Output, i: int, stream: str, n: int, spill: bool) -> Acts:
    d = out.work / f"acts-{i}"
    files = sorted(d.glob(f"{stream}-*.pt")) if d.is_dir() else []
    if len(files) != n:
        raise ValueError(f"dst: the saved activations after unit {i} ({str(d)!r}) are incomplete; pass resume=False "
                         "to start over")
    return Acts(list(files) if spill else [torch.load(f, weights_only=True) for f in files])
