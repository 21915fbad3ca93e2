"""How close a quantized model is to its float original, and how small its file is.

For logits ``z`` (float) and ``z^`` (quantized) of the same ``N`` inputs:

* accuracy: ``mean(argmax z^ == y)``;
* agreement: ``mean(argmax z^ == argmax z)`` (top-1 predictions that did not change);
* KL: ``mean_n KL(softmax(z_n) || softmax(z^_n)) = mean_n sum_c p_c (log p_c - log p^_c)`` in nats,
  the information lost on the predictive distribution (computed in float64 from log-softmax).

Sizes are real files: the quantized model as ``lb.save`` writes it (safetensors + quantization
map), the float model as ``safetensors.torch.save_file(model.state_dict())`` writes it (the same
container, so the ratio compares like with like).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator

import safetensors.torch
import torch
from torch import nn

from ..batches import model_device
from ..checkpoint import save

__all__ = ["Fidelity", "fidelity", "logits_of", "checkpoint_bytes", "float_checkpoint_bytes", "torch_threads"]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (``None``: leave it), restored afterwards."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be None or an int >= 1, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True)
class Fidelity:
    """Quantized versus float predictions on one set of inputs (see the module docstring)."""

    samples: int
    kl: float
    agreement: float
    accuracy: float | None = None          # None without labels
    float_accuracy: float | None = None


def logits_of(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``model(x)`` in eval mode without gradients, batch by batch, as float32 on the CPU."""
    was_training = model.training
    device = model_device(model)
    model.eval()
    try:
        with torch.no_grad():
            outs = [model(x[i:i + batch_size].to(device) if device is not None else x[i:i + batch_size])
                    for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
        raise TypeError("the model must return a tensor of logits (N, classes) for prediction metrics")
    return torch.cat([o.float().cpu() for o in outs])


def fidelity(float_logits: torch.Tensor, quant_logits: torch.Tensor, labels: torch.Tensor | None = None) -> Fidelity:
    """Compare two ``(N, classes)`` logit tensors (and ``labels`` if given)."""
    if float_logits.shape != quant_logits.shape or float_logits.ndim != 2:
        raise ValueError(f"logits must both be (N, classes); got {tuple(float_logits.shape)} and "
                         f"{tuple(quant_logits.shape)}")
    lp = torch.log_softmax(float_logits.double(), dim=1)
    lq = torch.log_softmax(quant_logits.double(), dim=1)
    kl = (lp.exp() * (lp - lq)).sum(1).mean().item()
    top_f, top_q = float_logits.argmax(1), quant_logits.argmax(1)
    agreement = (top_f == top_q).double().mean().item()
    acc = facc = None
    if labels is not None:
        acc = (top_q == labels).double().mean().item()
        facc = (top_f == labels).double().mean().item()
    return Fidelity(samples=len(float_logits), kl=max(kl, 0.0), agreement=agreement, accuracy=acc, float_accuracy=facc)


def checkpoint_bytes(q: nn.Module) -> int:
    """Size of the file ``lb.save(q, path)`` writes (written to a temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="lowbit-size-") as d:
        path = os.path.join(d, "model.safetensors")
        save(q, path)
        return os.path.getsize(path)


def float_checkpoint_bytes(model: nn.Module) -> int:
    """Size of ``safetensors.torch.save_file(model.state_dict(), path)`` (no file is written); a tensor
    reached by several names (tied weights) is stored once, as ``safetensors.torch.save_model`` does."""
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.device.type, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if key not in seen:
            seen.add(key)
            state[k] = v.detach().cpu().contiguous()
    return len(safetensors.torch.save(state))
