"""``lb.gptq``: GPTQ over a whole quantized model, layer after layer.

Sequential, as in the paper: the layers are quantized in the order the model calls them, and
each one's Hessian is collected from the inputs the *already quantized* earlier layers produce.
Every step runs the calibration batches through the model with a forward pre-hook on the layers
still to do; the first one called opens a *group* together with the layers called on the very
same input tensor (``q``/``k``/``v`` projections, parallel branches), which cannot affect each
other; the pass stops (by an exception the driver catches) as soon as another pending layer is
about to run. The group is then quantized and pinned, and the next step starts. Only one group's
Hessians (``d x d`` each) are held at a time. Blocks whose layers are all final are replayed from
their recorded outputs instead of recomputed (:mod:`lowbit.gptq.cache`), so a pass costs little
more than the block it quantizes.

A layer called several times per forward (shared weights) sees only the calls before the next
pending layer; layers no batch reaches keep round to nearest and are listed as ``unreached``.
"""
from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import logging
import time
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import ops
from ..modules import QuantLayer, WeightQuantizer
from ..quantize import quant_layers
from ..spec import PerTensor
from .blockwise import capture_inputs, chain_plan, gptq_block, next_inputs
from .cache import BlockCache, find_blocks
from .inputs import Hessian, gemm_inputs, run_batch, to_device
from .report import GPTQReport, LayerReport, output_error
from .solver import check_spec, solve

__all__ = ["gptq"]

log = logging.getLogger(__name__)


_RESTORE_COPY = contextvars.ContextVar("lowbit_gptq_restore_copy", default=True)


@contextlib.contextmanager
def without_restore_copy():
    """Inside this context ``lb.gptq`` keeps no copy of the float weights to restore if it fails
    (the grids are still restored). For a caller that throws the model away on failure anyway:
    streamed quantization (:mod:`lowbit.stream`) drops the unit and redoes it from the shards,
    and the copy, a whole block's float weights, would sit beside GPTQ's largest Hessian."""
    token = _RESTORE_COPY.set(False)
    try:
        yield
    finally:
        _RESTORE_COPY.reset(token)


class _Stop(Exception):
    """Raised inside a forward to end a pass once the current group has seen its inputs."""


class _Collector:
    """Forward pre-hook state: the current group's layers, Hessians and shared input."""

    def __init__(self, pending: dict[QuantLayer, str], dtype_of) -> None:
        self.pending = pending
        self.dtype_of = dtype_of
        self.group: dict[QuantLayer, Hessian] = {}
        self.batch_input: torch.Tensor | None = None
        self.cache: BlockCache | None = None

    def new_batch(self) -> None:
        self.batch_input = None

    def __call__(self, layer: nn.Module, args: tuple) -> None:
        if layer not in self.pending or not args:
            return
        if self.cache is not None:
            self.cache.dirty = True
        x = args[0]
        if self.batch_input is None and (not self.group or layer in self.group):
            self.batch_input = x
        elif not (layer in self.group or x is self.batch_input):
            raise _Stop
        hess = self.group.setdefault(layer, Hessian(self.dtype_of(layer)))
        with torch.no_grad():
            hess.add(gemm_inputs(layer, x))


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _select(model: nn.Module, include, exclude) -> list[tuple[str, QuantLayer]]:
    layers = quant_layers(model)
    if not layers:
        raise ValueError("gptq: model has no quantized layer; call lb.quantize(model, weights=...) first")
    names = [n for n, _ in layers]
    sel = []
    for arg, pats in (("include", include), ("exclude", exclude)):
        if pats is None:
            continue
        pats = [pats] if isinstance(pats, str) else list(pats)
        for p in pats:
            if not isinstance(p, str) or not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(f"gptq: {arg} pattern {p!r} matches no quantized layer; names look like "
                                 f"{names[:6]}")
        sel.append((arg, pats))
    out = []
    for name, layer in layers:
        ok = all((arg == "include") == any(fnmatch.fnmatchcase(name, p) for p in pats) for arg, pats in sel)
        if ok and layer.weight_quant.enabled:
            out.append((name, layer))
    for name, layer in out:
        if layer.frozen:
            raise ValueError(f"gptq: layer {name!r} is frozen; run lb.gptq before lb.freeze")
        try:
            check_spec(layer.weight_quant.spec)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
    return out


def _check_args(damp, block_size, act_order, replay) -> None:
    if not isinstance(replay, bool):
        raise TypeError(f"replay must be a bool, got {replay!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"damp must be a number >= 0 (a fraction of mean(diag H), e.g. 0.01), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1 (e.g. 128), got {block_size!r}")
    if not isinstance(act_order, bool):
        raise TypeError(f"act_order must be a bool, got {act_order!r}")


def _quantize_layer(name: str, layer: QuantLayer, hess: Hessian, damp: float, block_size: int,
                    act_order: bool, keep_grid: bool = False) -> LayerReport:
    t0 = time.perf_counter()
    wq_mod: WeightQuantizer = layer.weight_quant
    spec = wq_mod.spec
    weight = layer.weight.detach()
    w = WeightQuantizer.gemm_view(weight).to(_compute_dtype(weight))
    hsum = hess.sum
    groups = hsum.shape[0]
    rows = w.shape[0]
    # round to nearest on the layer's own grid, for the report (its copy freed before the solve)
    s_rtn, z_rtn = wq_mod.qparams(layer.weight)
    w_rtn = ops.fake_quantize(w, spec.replace(rounding="nearest"), s_rtn, z_rtn)
    dw = w - w_rtn
    del w_rtn
    rtn_error = output_error(dw, hsum, hess.n)
    del dw
    # a per-tensor grid is one grid for all the GEMM groups of a grouped convolution
    grid = ops.choose_qparams(w, spec, wq_mod.observer, **wq_mod.observer_options) \
        if groups > 1 and isinstance(spec.granularity, PerTensor) else None
    pinned = keep_grid and wq_mod.fixed   # keep the grid pinned before GPTQ (e.g. GGUF-representable scales)
    outs, scales, zps, lams = [], [], [], []
    chunk = rows // groups
    for g in range(groups):
        if pinned:
            s_p, z_p = wq_mod.scale, wq_mod.zero_point
            grid = (s_p, z_p) if s_p.dim() == 0 else (s_p[g * chunk:(g + 1) * chunk], z_p[g * chunk:(g + 1) * chunk])
        out, s, z, lam = solve(w[g * chunk:(g + 1) * chunk], hsum[g], spec, wq_mod.observer,
                               wq_mod.observer_options, damp=damp, block_size=block_size, act_order=act_order,
                               grid=grid)
        outs.append(out), scales.append(s), zps.append(z), lams.append(lam)
    w_q = outs[0] if groups == 1 else torch.cat(outs)
    del outs
    if groups == 1 or scales[0].dim() == 0:
        scale, zero_point = scales[0], zps[0]
    else:
        scale, zero_point = torch.cat(scales), torch.cat(zps)
    errors = {"rtn_error": rtn_error, "gptq_error": output_error(w - w_q, hsum, hess.n),
              "output_power": output_error(w, hsum, hess.n)}
    with torch.no_grad():
        layer.weight.copy_(w_q.reshape(weight.shape).to(weight.dtype))
    wq_mod.fix_qparams(scale, zero_point)
    return LayerReport(name=name, rows=rows, columns=w.shape[1], samples=hess.n, damp=max(lams),
                       seconds=time.perf_counter() - t0, **errors)


def _model_calls(q: nn.Module, batches, device):
    """A pass over the calibration set: ``[(batch index, run q on it)]``, fresh each time."""
    return lambda: [(i, lambda b=b: run_batch(q, to_device(b, device))) for i, b in enumerate(batches)]


def _run_groups(pending: dict, calls, report: GPTQReport, damp: float, block_size: int, act_order: bool,
                keep_grid: bool, cache: BlockCache | None = None) -> None:
    """Quantize the layers of ``pending`` group by group (popping them) until a pass reaches none.

    ``calls()`` gives one pass: ``[(batch index, fn)]``; each ``fn`` runs a forward that reaches the
    layers (a whole model, or one block on its cached inputs) and may be stopped by :class:`_Stop`.
    """
    collector = _Collector(pending, lambda layer: _compute_dtype(layer.weight))
    collector.cache = cache
    hooks = [layer.register_forward_pre_hook(collector) for layer in pending]
    try:
        while pending:
            collector.group = {}
            with torch.no_grad():
                for index, fn in calls():
                    collector.new_batch()
                    if cache is not None:
                        cache.new_batch(index)
                    try:
                        fn()
                    except _Stop:
                        pass
            if not collector.group:
                break
            for layer, hess in collector.group.items():
                name = pending.pop(layer)
                r = _quantize_layer(name, layer, hess, damp, block_size, act_order, keep_grid)
                log.info("gptq %s: output error %.3e -> %.3e (%.1fx)", name, r.rtn_error, r.gptq_error, r.gain)
                report.layers.append(r)
    finally:
        for h in hooks:
            h.remove()


def _raise_stop(*_args, **_kwargs):
    raise _Stop


def _blockwise(q: nn.Module, blocks: list, batches, pending: dict, device, report: GPTQReport, args) -> None:
    """The chain path (:mod:`lowbit.gptq.blockwise`): layers before the first block by stopped
    model passes, each block from the previous block's outputs, then the layers after the last
    block by full model passes. Holds one block's inputs and outputs at a time."""
    inside = [{layer: pending[layer] for layer in b.modules() if layer in pending} for b in blocks]
    in_blocks = {layer for d in inside for layer in d}
    outside = {layer: name for layer, name in pending.items() if layer not in in_blocks}
    stop = blocks[0].register_forward_pre_hook(_raise_stop)
    try:
        _run_groups(outside, _model_calls(q, batches, device), report, *args)
    finally:
        stop.remove()
    inputs = capture_inputs(q, blocks[0], batches, device)
    for b, layers in zip(blocks, inside):
        outs, _ = gptq_block(b, inputs, damp=args[0], block_size=args[1], act_order=args[2], keep_grid=args[3],
                             layers=layers, report=report, outputs=b is not blocks[-1])
        inputs = next_inputs(inputs, outs) if outs is not None else None
        del outs
    del inputs
    _run_groups(outside, _model_calls(q, batches, device), report, *args)
    for layer in list(pending):
        if layer in in_blocks or layer not in outside:
            pending.pop(layer)


def backup_layers(layers) -> dict:
    """What :func:`restore_layers` needs to undo GPTQ on ``layers`` after a failure: each layer's
    grid, and its float weight unless :func:`without_restore_copy` is in effect."""
    keep = _RESTORE_COPY.get()
    return {layer: (layer.weight.detach().clone() if keep else None, layer.weight_quant.scale,
                    layer.weight_quant.zero_point, layer.weight_quant.fixed) for layer in layers}


def restore_layers(backup: dict) -> None:
    """Put back the weights (where copied) and grids saved by :func:`backup_layers`."""
    with torch.no_grad():
        for layer, (w, s, z, fixed) in backup.items():
            if w is not None:
                layer.weight.copy_(w)
            layer.weight_quant.scale, layer.weight_quant.zero_point = s, z
            layer.weight_quant.fixed = fixed


@torch.inference_mode(False)   # what it builds stays ordinary tensors when called inside inference_mode
def gptq(q: nn.Module, batches: Iterable, *, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
         replay: bool = True, keep_grid: bool = False, include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None) -> GPTQReport:
    """Quantize the weights of ``q`` (from ``lb.quantize``, before ``lb.freeze``) by GPTQ, in place.

    Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers"; the per-matrix algorithm is in :mod:`lowbit.gptq.solver`, the layer order in
    this module's docstring. Each layer's float master weight is replaced by its GPTQ weight, which
    lies exactly on the grid, and that grid is pinned (``weight_quant.fix_qparams``), so the
    module's forward and ``lb.freeze`` reproduce GPTQ's integers exactly. The grid's range method
    is the layer's own (``weight_observer`` of ``lb.quantize``).

    Args:
        batches: calibration inputs, iterated once per layer group: each a tensor (``q(x)``), a
            tuple of positional args (``q(*args)``) or a dict of keyword args (``q(**kwargs)``).
            A one-shot iterator is materialized into a list.
        damp: diagonal damping, as a fraction of ``mean(diag H)``.
        block_size: columns per lazy update block (only speed depends on it).
        act_order: quantize columns in order of decreasing ``diag(H)``; per-group grids are then
            fitted up front to the original weights (static groups).
        replay: replay the recorded outputs of blocks whose layers are all final instead of
            recomputing them (:mod:`lowbit.gptq.cache`; same result, faster). Needs a model whose
            blocks compute the same output for the same batch (eval mode: the driver sets it).
        include / exclude: glob patterns over layer names selecting the layers to run GPTQ on
            (the others keep round to nearest).
        keep_grid: layers whose grid is already pinned (``weight_quant.fix_qparams``, e.g. by the
            ``gguf_grid`` transform) keep it; GPTQ then only chooses the codes.

    Returns a :class:`GPTQReport`. If anything fails, every layer's weight and grid is restored
    (the weights from a copy made up front; :func:`without_restore_copy` skips it).
    """
    if not isinstance(q, nn.Module):
        raise TypeError(f"q must be a torch.nn.Module from lb.quantize, got {type(q).__name__}")
    _check_args(damp, block_size, act_order, replay)
    if isinstance(batches, torch.Tensor) or isinstance(batches, dict):
        raise TypeError("batches must be an iterable of batches (e.g. a list [x1, x2] or a DataLoader), "
                        "not a single batch; wrap it: [x]")
    try:
        batches = list(batches) if iter(batches) is batches else batches
    except TypeError:
        raise TypeError(f"batches must be an iterable of model inputs, got {type(batches).__name__}") from None
    if not any(True for _ in batches):
        raise ValueError("batches is empty: GPTQ needs calibration inputs")
    selected = _select(q, include, exclude)
    pending = {layer: name for name, layer in selected}
    device = next((t.device for t in q.parameters()), torch.device("cpu"))

    backup = backup_layers(pending)
    report = GPTQReport()
    t_start = time.perf_counter()
    was_training = q.training
    q.eval()
    # During the passes the selected layers run on their float master weights: a finished layer's
    # weight is exactly on its pinned grid (fake quantization would return it unchanged), and a
    # pending layer's output is never used before the pass stops. This skips the fake quantization.
    for layer in pending:
        layer.weight_quant.enabled = False
    args = (float(damp), block_size, act_order, keep_grid)
    ok = False
    try:
        blocks = find_blocks(q, set(pending)) if replay else []
        if blocks and chain_plan(q, blocks, next(iter(batches)), pending, device):
            _blockwise(q, blocks, batches, pending, device, report, args)
        else:
            cache = BlockCache(blocks, pending) if replay else None
            if cache is not None:
                cache.install()
            try:
                _run_groups(pending, _model_calls(q, batches, device), report, *args, cache=cache)
            finally:
                if cache is not None:
                    cache.remove()
        report.unreached.extend(pending.values())
        ok = True
    finally:
        for layer in backup:
            layer.weight_quant.enabled = True
        q.train(was_training)
        if not ok:
            restore_layers(backup)
    if report.unreached:
        log.warning("gptq: %d layers were not reached by the calibration batches and keep round to nearest: %s",
                    len(report.unreached), report.unreached)
    report.seconds = time.perf_counter() - t_start
    return report
