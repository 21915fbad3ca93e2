"""What a quantized layer multiplies its weight with: GEMM inputs, their Hessian, running a batch.

A Linear layer computes ``y = W x`` on every row ``x`` of its input reshaped to ``[-1, in]``. A
convolution is the same GEMM on the unfolded input (im2col): each output position multiplies the
GEMM weight ``[out, in/groups * k...]`` with the patch under the kernel, laid out in the weight's
``(channel, k...)`` order (``torch.nn.functional.unfold``). A grouped convolution is ``groups``
independent GEMMs, each with its own inputs and Hessian.

``Hessian`` accumulates ``sum_x x x^T`` (GPTQ's ``H = 2 X X^T / n`` up to a factor that neither the
solution nor the damping depends on) and the number of vectors ``n``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..modules import QuantLayer

__all__ = ["gemm_inputs", "Hessian", "run_batch", "to_device"]


def gemm_inputs(layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """The vectors ``layer``'s GEMM weight multiplies, as ``[groups, n, d]`` (groups = 1 for Linear)."""
    if layer.input_quant is not None:
        x = layer.input_quant(x)
    try:
        return layer.gemm_inputs(x)          # each layer type says what its GEMM weight multiplies
    except NotImplementedError:
        raise TypeError(f"gptq: no GEMM view for {type(layer).__name__}") from None


class Hessian:
    """Running ``sum x x^T`` ``[groups, d, d]`` and count ``n`` of a layer's GEMM inputs."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.sum: torch.Tensor | None = None
        self.n = 0

    def add(self, cols: torch.Tensor) -> None:
        cols = cols.detach().to(self.dtype)
        cols = torch.nan_to_num(cols, nan=0.0, posinf=0.0, neginf=0.0)
        xtx = cols.transpose(1, 2) @ cols
        self.sum = xtx if self.sum is None else self.sum.add_(xtx)
        self.n += cols.shape[1]


def to_device(batch, device: torch.device):
    """``batch`` with every tensor inside it (tuples, lists, dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def run_batch(model: torch.nn.Module, batch):
    """Call ``model`` on one batch: a tensor (``model(x)``), a tuple/list of positional args
    (``model(*args)``), or a dict of keyword args (``model(**kwargs)``)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
