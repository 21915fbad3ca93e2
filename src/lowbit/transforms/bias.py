"""Bias correction: remove the mean output shift that quantization introduces, layer by layer.

Nagel, van Baalen, Blankevoort, Welling 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction" (ICCV), Sec. 4.2. With quantized weights ``W~ = W + eps`` a layer computes
``y~ = W~ x + b = y + eps x``, so its outputs are shifted on average by

    E[y~ - y] = eps E[x]            (per output channel; for a convolution, eps applied to the mean
                                     of the unfolded input patches, i.e. the mean over all positions)

which the next layers see as a systematic error (it does not average out like rounding noise).
Subtracting the measured shift from the bias, ``b' = b - E[y~ - y]``, makes the quantized layer's
mean output equal the float one on the calibration data. This is the *empirical* variant (the
paper's analytic variant estimates E[x] from BatchNorm statistics instead of data).

We measure ``E[y~ - y]`` over the calibration batches as the exact mean of the outputs (for a
convolution that is ``eps`` applied to the exact mean of the unfolded input, padding included), in
one of two ways (``mode``):

* ``"layer"``: ``y`` is the same layer with float weights, float input and its original
  (uncorrected) bias, run on the input the layer actually receives in the quantized model. This
  removes the shift caused by this layer's own quantization: ``eps E[x]`` plus, when the input
  quantizer is calibrated, the shift from rounding/clipping the input.
* ``"model"`` (default): ``y`` is the float model's output of that layer (all quantizers off,
  original biases), run side by side as in the paper. This also removes shifts propagated from
  earlier layers, so each layer's mean matches the float network's. It measured better than
  ``"layer"`` on every recipe of ``benchmarks/bench_transforms.py`` (digits CNN, 3 seeds: logit
  SQNR +0.4..2.0 dB).

Layers are corrected one at a time in execution order, so every layer is measured with its
predecessors already corrected (each pass stops right after the layer being corrected). Each
corrected layer remembers the total shift removed (attribute ``lowbit_bias_shift``), so the
float reference keeps using the original bias and a second correction does not compound.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Iterable

import torch
from torch import nn

from .. import batches as _batches
from ..modules import QuantLayer, Quantizer
from .verify import check_preserved

__all__ = ["bias_correction", "output_bias", "MODES"]

log = logging.getLogger(__name__)

MODES = ("layer", "model")


_SHIFT = "lowbit_bias_shift"   # layer attribute: total shift removed from its bias so far


def _float_bias(layer: QuantLayer) -> torch.Tensor | None:
    """The layer's bias before any correction (``bias + shift removed``)."""
    shift = getattr(layer, _SHIFT, None)
    if shift is None:
        return layer.bias
    return layer.bias + shift.to(layer.bias)


@contextlib.contextmanager
def _uncorrected(layers):
    """Temporarily give every layer its uncorrected bias (for the float reference pass)."""
    saved = []
    for _, m in layers:
        if getattr(m, _SHIFT, None) is not None:
            saved.append((m, m.bias.data.clone()))
            m.bias.data.copy_(_float_bias(m))
    try:
        yield
    finally:
        for m, b in saved:
            m.bias.data.copy_(b)


@contextlib.contextmanager
def _float_stage(model: nn.Module):
    """``model`` as the float network bias correction measures against: quantizers off, original biases."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    enabled = [m.enabled for m in quantizers]
    try:
        for m in quantizers:
            m.enabled = False
        with _uncorrected(layers):
            yield model
    finally:
        for m, e in zip(quantizers, enabled):
            m.enabled = e


class _Stop(Exception):
    """Raised from a hook once the layer of interest has run, to skip the rest of the forward."""


def _channel_sums(y: torch.Tensor, layer: QuantLayer) -> tuple[torch.Tensor, int]:
    dim = layer.channel_dim % y.dim()
    rows = y.detach().to(torch.float64).movedim(dim, 0).reshape(y.shape[dim], -1)
    return rows.sum(1), rows.shape[1]


class _Mean:
    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, sums: torch.Tensor, n: int) -> None:
        self.total = sums if self.total is None else self.total + sums
        self.count += n

    def value(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


def _check(q: nn.Module, mode: str) -> list[tuple[str, QuantLayer]]:
    if not isinstance(q, nn.Module):
        raise TypeError(f"q must be a torch.nn.Module quantized by lb.quantize, got {type(q).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    layers = [(n, m) for n, m in q.named_modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise ValueError("q has no quantized layer: bias correction acts on a quantized model; "
                         "call q = lb.quantize(model, ...) first and pass q")
    frozen = [n for n, m in layers if m.frozen]
    if frozen:
        raise ValueError(f"layers {frozen} are frozen (their float weights are gone): apply bias_correction "
                         "before lb.freeze")
    return layers


class _Runner:
    """Runs the model over the batches in eval mode and without gradients."""

    def __init__(self, model: nn.Module, data: list) -> None:
        self.model, self.data = model, data
        self.device = _batches.model_device(model)

    def run(self) -> None:
        for b in self.data:
            try:
                _batches.call(self.model, b, self.device)
            except _Stop:
                pass


def _float_pass(model: nn.Module, layers, runner: _Runner, record_means: bool):
    """Execution order, calls per batch, and (optionally) each layer's float output mean."""
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    enabled = [m.enabled for m in quantizers]
    means = {n: _Mean() for n, _ in layers}
    order: list[str] = []
    calls: dict[str, list[int]] = {n: [] for n, _ in layers}
    current: dict[str, int] = {}

    def hook_for(name):
        def hook(mod, inp, out):
            if name not in order:
                order.append(name)
            current[name] = current.get(name, 0) + 1
            if record_means:
                means[name].add(*_channel_sums(out, mod))
        return hook

    hooks = [m.register_forward_hook(hook_for(n)) for n, m in layers]
    try:
        if record_means:
            for m in quantizers:
                m.enabled = False
        with _uncorrected(layers if record_means else []):
            for b in runner.data:
                current.clear()
                _batches.call(model, b, runner.device)
                for n in calls:
                    calls[n].append(current.get(n, 0))
    finally:
        for h in hooks:
            h.remove()
        for m, e in zip(quantizers, enabled):
            m.enabled = e
    return order, calls, {n: m.value() for n, m in means.items() if m.count}


def _measure(layer: QuantLayer, runner: _Runner, mode: str, per_batch_calls: list[int] | None) -> _Mean:
    """Mean per output channel of ``y~ - y`` (mode "layer") or of ``y~`` (mode "model")."""
    acc = _Mean()
    seen = [0]
    stop_after = per_batch_calls[0] if per_batch_calls and len(set(per_batch_calls)) == 1 else None

    def hook(mod, inp, out):
        y = out
        if mode == "layer":
            y = out - mod.op(inp[0], mod.weight, _float_bias(mod))
        acc.add(*_channel_sums(y, mod))
        seen[0] += 1
        if stop_after is not None and seen[0] == stop_after:
            seen[0] = 0
            raise _Stop

    h = layer.register_forward_hook(hook)
    try:
        runner.run()
    finally:
        h.remove()
    return acc


def _set_bias(layer: QuantLayer, delta: torch.Tensor) -> None:
    w = layer.weight
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                  requires_grad=w.requires_grad)
    layer.bias.data.sub_(delta.to(layer.bias.dtype))
    shift = getattr(layer, _SHIFT, None)
    setattr(layer, _SHIFT, delta.to(layer.bias.dtype) if shift is None else shift + delta.to(shift.dtype))


def _prepare(q: nn.Module, batches: Iterable, mode: str):
    layers = _check(q, mode)
    data = _batches.as_batches(batches)
    return layers, data


@torch.no_grad()
def output_bias(q: nn.Module, batches: Iterable, mode: str = "model") -> dict[str, torch.Tensor]:
    """Per quantized layer, the mean output error per output channel over ``batches``.

    ``E[y~ - y]`` as defined by ``mode`` (see the module docstring), measured in one pass without
    changing anything: ``bias_correction`` drives these to zero. Layers never called are left out.
    """
    layers, data = _prepare(q, batches, mode)
    was_training = q.training
    q.eval()
    try:
        runner = _Runner(q, data)
        ref = _float_pass(q, layers, runner, record_means=True)[2] if mode == "model" else {}
        out = {}
        for name, layer in layers:
            acc = _measure(layer, runner, mode, None)
            if acc.count:
                out[name] = acc.value() - ref[name] if mode == "model" else acc.value()
    finally:
        q.train(was_training)
    return out


@torch.inference_mode(False)   # what it builds stays ordinary tensors when called inside inference_mode
@torch.no_grad()
def bias_correction(q: nn.Module, batches: Iterable, mode: str = "model") -> nn.Module:
    """A bias-corrected copy of the quantized model ``q`` (``q`` itself is not modified).

    For each quantized layer in execution order, the mean output shift ``E[y~ - y]`` per output
    channel is measured on ``batches`` (see the module docstring for ``mode``) and subtracted from
    the layer's bias (a zero bias is created where the layer has none). Call it after
    ``lb.quantize`` (and ``lb.calibrate``, so activation quantization is part of what is
    corrected) and before ``lb.freeze``. The removed shifts are in ``copy.lowbit_bias_correction``.

    Args:
        q: a model returned by ``lb.quantize``, not frozen.
        batches: calibration inputs (tensors, argument tuples or keyword dicts; see
            :mod:`lowbit.batches`). Iterated several times (once per layer), so it is materialized.
        mode: ``"layer"`` or ``"model"``.
    """
    _, data = _prepare(q, batches, mode)  # validate before copying
    out = copy.deepcopy(q)
    layers = _check(out, mode)
    by_name = dict(layers)
    out.eval()
    runner = _Runner(out, data)
    order, calls, ref = _float_pass(out, layers, runner, record_means=mode == "model")
    shifts = {}
    for name in order:
        acc = _measure(by_name[name], runner, mode, calls[name])
        if not acc.count:
            continue
        delta = acc.value() - ref[name] if mode == "model" else acc.value()
        _set_bias(by_name[name], delta)
        shifts[name] = delta.float()
    unused = [n for n, _ in layers if n not in order]
    if unused:
        log.warning("lowbit: bias_correction: layers %s saw no data and were not corrected", unused)
    with _float_stage(q), _float_stage(out):   # the float stage must be q's float function still
        check_preserved(q, out, data[0], lambda m, b: _batches.call(m, b, runner.device),
                        "bias_correction's float stage", sorted(shifts))
    out.train(q.training)
    out.lowbit_bias_correction = shifts
    return out
