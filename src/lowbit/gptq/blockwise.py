"""Block by block: GPTQ on one block from its cached inputs, and the chain of blocks of a model.

A transformer is a chain of blocks (decoder layers): block ``b + 1`` is called on the output of
block ``b``, with the same extra arguments (attention mask, position embeddings) for every block.
GPTQ can then run on one block at a time (as in the reference implementation of Frantar et al.
2022): record the inputs of the first block for every calibration batch, quantize the block's
layers group by group from those inputs alone, run the quantized block once more to get its
outputs, which are the next block's inputs, and drop the old inputs. Memory: one block's inputs
and outputs over the calibration set and one layer group's Hessians, whatever the depth.

The public pieces (used by ``lb.gptq`` and by streamed quantization, which loads one block at a
time):

* :func:`capture_inputs` ``(model, block, batches) -> inputs``: the ``(args, kwargs)`` each batch
  calls ``block`` with (the model run stops there);
* :func:`gptq_block` ``(block, inputs, ...) -> (outputs, report)``: GPTQ on the quantized layers of
  ``block`` (from ``lb.quantize``) in place, and the block's outputs per batch afterwards;
* :func:`run_block` and :func:`next_inputs`: a block's outputs, and the next block's inputs from them.

Keyword arguments that are neither tensors nor plain values (a key/value cache object) are
deep-copied from their state at capture for every call, so repeated calls do not accumulate state.

``lb.gptq`` uses this path only after checking, on the first batch, that the model really is such a
chain (:func:`chain_plan`): every block called once, in order, each on the previous block's output
and the first block's other arguments, no quantized layer outside the blocks called between them,
and a replay of the first batch block by block reproducing every block's input and output
bit for bit; the blocks must be consecutive children of one ``nn.ModuleList``/``nn.Sequential``. Otherwise it runs its full-model passes (:mod:`lowbit.gptq.driver`).
"""
from __future__ import annotations

import copy
import logging
from typing import Sequence

import torch
from torch import nn

from ..modules import QuantLayer
from .inputs import run_batch, to_device
from .report import GPTQReport

__all__ = ["capture_inputs", "gptq_block", "run_block", "next_inputs", "chain_plan"]

log = logging.getLogger(__name__)

Inputs = list[tuple[tuple, dict]]


class _Captured(Exception):
    pass


def _plain(v) -> bool:
    if v is None or isinstance(v, (torch.Tensor, bool, int, float, str, torch.dtype, torch.device)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_plain(e) for e in v)
    if isinstance(v, dict):
        return all(_plain(e) for e in v.values())
    return False


def _fresh(kwargs: dict) -> dict:
    """``kwargs`` with every non-plain value (e.g. a KV cache) deep-copied."""
    return {k: (v if _plain(v) else copy.deepcopy(v)) for k, v in kwargs.items()}


def call_block(block: nn.Module, inp: tuple[tuple, dict]):
    args, kwargs = inp
    return block(*args, **_fresh(kwargs))


def main_output(out) -> torch.Tensor | None:
    """The tensor a chained block passes on: the output itself, or its first element."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def next_inputs(inputs: Inputs, outputs: list) -> Inputs:
    """The next block's inputs: each batch's ``(args, kwargs)`` with ``args[0]`` replaced by the
    block's (main) output."""
    out = []
    for (args, kwargs), o in zip(inputs, outputs):
        m = main_output(o)
        if m is None:
            raise TypeError(f"a chained block must return a tensor or a tuple starting with one, got {type(o).__name__}")
        out.append(((m,) + tuple(args[1:]), kwargs))
    return out


def run_block(block: nn.Module, inputs: Inputs) -> list:
    """``block``'s output on every cached input (no gradients)."""
    with torch.no_grad():
        return [call_block(block, inp) for inp in inputs]


def capture_inputs(model: nn.Module, block: nn.Module, batches: Sequence, device=None) -> Inputs:
    """The ``(args, kwargs)`` each batch calls ``block`` with; the model run stops at the block.
    A batch that never reaches the block contributes nothing (as in a full forward)."""
    captured: Inputs = []

    def hook(_m, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _Captured

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    run_batch(model, to_device(batch, device) if device is not None else batch)
                except _Captured:
                    pass
    finally:
        h.remove()
    return captured


def gptq_block(block: nn.Module, inputs: Inputs, *, damp: float = 0.01, block_size: int = 128,
               act_order: bool = False, keep_grid: bool = False, layers: dict | None = None,
               report: GPTQReport | None = None, outputs: bool = True):
    """GPTQ on the quantized layers of one ``block``, calibrated on its cached ``inputs``, in place.

    Args:
        inputs: one ``(args, kwargs)`` per calibration batch (:func:`capture_inputs`, or the
            previous block's :func:`next_inputs`).
        layers: ``{layer: name}`` to quantize (default: every enabled, unfrozen ``QuantLayer`` of
            the block, named by its path inside the block).
        report: a :class:`GPTQReport` to append to (default: a new one).
        outputs: also return the block's outputs after quantization (the next block's inputs).

    Layers are quantized in the order the block calls them, in groups of layers reading the same
    tensor, each from the inputs the already-quantized layers produce (:mod:`lowbit.gptq.driver`).
    Returns ``(outputs or None, report)``; layers no input reaches are listed in
    ``report.unreached`` and keep round to nearest. On failure the block's layers are restored.
    """
    from .driver import _check_args, _run_groups, backup_layers, restore_layers   # the driver's
    _check_args(damp, block_size, act_order, True)
    if layers is None:
        layers = {m: n for n, m in block.named_modules()
                  if isinstance(m, QuantLayer) and m.weight_quant.enabled and not m.frozen}
    report = report if report is not None else GPTQReport()
    pending = dict(layers)
    was_training = block.training
    block.eval()
    backup = backup_layers(pending)
    enabled = {layer: layer.weight_quant.enabled for layer in pending}
    for layer in pending:   # the float master weights: exact for finished layers, unused for pending ones
        layer.weight_quant.enabled = False
    ok = False
    try:
        _run_groups(pending, lambda: [(None, lambda inp=inp: call_block(block, inp)) for inp in inputs],
                    report, float(damp), block_size, act_order, keep_grid)
        report.unreached.extend(pending.values())
        outs = run_block(block, inputs) if outputs else None
        ok = True
    finally:
        block.train(was_training)
        for layer, flag in enabled.items():
            layer.weight_quant.enabled = flag
        if not ok:
            restore_layers(backup)
    return outs, report


def _fingerprint(t: torch.Tensor) -> tuple:
    d = t.detach().double()
    return tuple(t.shape), float(d.sum()), float(d.square().sum())


def _consecutive(model: nn.Module, blocks: list[nn.Module]) -> bool:
    """Whether ``blocks`` are consecutive children of one ``nn.ModuleList``/``nn.Sequential``."""
    for parent in model.modules():
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            children = list(parent.children())
            if blocks[0] in children:
                i = next(k for k, c in enumerate(children) if c is blocks[0])
                return children[i:i + len(blocks)] == blocks
    return False


def chain_plan(model: nn.Module, blocks: list[nn.Module], batch, pending: dict, device=None) -> bool:
    """Whether ``blocks`` form a chain that block-wise GPTQ reproduces exactly (module docstring),
    checked on one ``batch`` with the weights as they are now."""
    if not blocks or not _consecutive(model, blocks):
        return False
    order: list[int] = []
    records: dict[int, dict] = {}
    prev_out: list = [None]
    state = {"inside": None, "bad": False, "after_first": False, "after_last": False}
    outside = {layer for layer in pending if not any(layer in set(b.modules()) for b in blocks)}
    index = {b: i for i, b in enumerate(blocks)}

    def pre(m, args, kwargs):
        i = index[m]
        if state["inside"] is not None or not args or not isinstance(args[0], torch.Tensor):
            state["bad"] = True
            return
        state["inside"] = i
        order.append(i)
        records[i] = {"args": tuple(args), "kwargs": dict(kwargs), "in": _fingerprint(args[0]),
                      "chained": i > 0 and prev_out[0] is not None and args[0] is prev_out[0]}

    def post(m, args, kwargs, out):
        i = index[m]
        state["inside"] = None
        main = main_output(out)
        if main is None:
            state["bad"] = True
            return
        prev_out[0] = main
        records[i]["out"] = _fingerprint(main)
        if i == len(blocks) - 1:
            state["after_last"] = True

    def layer_pre(layer, args):
        if order and not state["after_last"]:
            state["bad"] = True       # a quantized layer outside the blocks runs between them

    hooks = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    hooks += [b.register_forward_hook(post, with_kwargs=True) for b in blocks]
    hooks += [layer.register_forward_pre_hook(layer_pre) for layer in outside]
    try:
        with torch.no_grad():
            run_batch(model, to_device(batch, device) if device is not None else batch)
    except Exception:   # noqa: BLE001  (any failure here only means: use the full-model passes)
        return False
    finally:
        for h in hooks:
            h.remove()
    if state["bad"] or order != list(range(len(blocks))):
        return False
    first = records[0]
    for i in range(1, len(blocks)):
        r = records[i]
        if not r["chained"] or len(r["args"]) != len(first["args"]) or r["kwargs"].keys() != first["kwargs"].keys():
            return False
        if any(a is not b for a, b in zip(r["args"][1:], first["args"][1:])):
            return False
        if any(r["kwargs"][k] is not first["kwargs"][k] for k in r["kwargs"]):
            return False
    # replay block by block from the first block's captured input: every input and output must match
    try:
        inputs = capture_inputs(model, blocks[0], [batch], device)
        with torch.no_grad():
            for i, b in enumerate(blocks):
                if _fingerprint(inputs[0][0][0]) != records[i]["in"]:
                    return False
                outs = run_block(b, inputs)
                if main_output(outs[0]) is None or _fingerprint(main_output(outs[0])) != records[i]["out"]:
                    return False
                inputs = next_inputs(inputs, outs)
    except Exception:   # noqa: BLE001
        return False
    return True
