"""Per-layer sensitivity: quantize one layer at a time, keep the others float, measure the output change.

For layer ``l`` the sensitivity is the mean over the analysis inputs of ``D(f(x), f_l(x))``, with
``f`` the float model, ``f_l`` the model with only layer ``l`` quantized (its weight and, as in the
quantized model, its input) and ``D`` the KL divergence of the softmax outputs (classifiers), the
output MSE (regressions) or ``1 - cosine`` (embeddings). To second order the KL of independent
small perturbations adds up (it is a quadratic form in the logit change, :mod:`.divergence`), so
``sum_l S_l`` predicts the divergence of the fully quantized model and the ranking says where the
error comes from. The same measurement at several bit widths per layer feeds mixed precision
(:mod:`.mixed`); this is the "quantize one layer, measure the loss change" sensitivity used by
HAWQ (Dong et al., ICCV 2019) with the output KL in place of the Hessian trace.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
from torch import nn

from .batches import as_batch_list, output_tensor, run_batch
from .divergence import METRICS, divergence
from .probe import Probe, weight_at_bits

__all__ = ["Sensitivity", "layer_sensitivity", "bit_sensitivity", "float_outputs", "choose_metric"]

log = logging.getLogger(__name__)


@dataclass
class Sensitivity:
    """Per-layer sensitivity (``layers``: name -> mean divergence), most sensitive first in ``ranking``.

    ``all_layers`` is the divergence with every layer quantized, ``additivity`` the ratio
    ``sum(layers) / all_layers`` (near 1 when the per-layer errors add up independently).
    """

    metric: str
    layers: dict[str, float]
    ranking: list[str]
    all_layers: float
    additivity: float
    weights_only: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def choose_metric(metric: str, labels_given: bool, outputs: torch.Tensor) -> str:
    """Resolve ``metric="auto"``: KL for classifiers (labels given), else cosine (vectors) or MSE (scalars)."""
    if metric == "auto":
        if labels_given:
            return "kl"
        return "cosine" if outputs.dim() >= 2 and outputs.shape[-1] > 1 else "mse"
    if metric not in METRICS:
        raise ValueError(f"metric must be 'auto' or one of {METRICS}, got {metric!r}")
    return metric


@torch.no_grad()
def float_outputs(model: nn.Module, batches: list) -> torch.Tensor:
    """The outputs of ``model`` on ``batches`` (eval mode), concatenated."""
    was = model.training
    model.eval()
    try:
        return torch.cat([output_tensor(run_batch(model, b)).detach() for b in batches])
    finally:
        model.train(was)


def _mean_div(ref: torch.Tensor, out: torch.Tensor, metric: str) -> float:
    return float(divergence(ref, out, metric).mean())


def layer_sensitivity(float_model: nn.Module, q: nn.Module, batches: Iterable, metric: str = "kl",
                      weights_only: bool = False, probe: Probe | None = None,
                      reference: torch.Tensor | None = None) -> Sensitivity:
    """Quantize each layer of ``q`` alone (as ``q`` does it) and measure the output divergence.

    Args:
        metric: ``"kl"`` (logits), ``"mse"`` or ``"cosine"`` (``"auto"`` picks cosine/mse by shape).
        weights_only: quantize only the layer's weight (not its input).
        probe / reference: a prepared :class:`Probe` and float outputs, to share work between analyses.
    """
    batches = as_batch_list(batches)
    probe = probe or Probe(float_model, q)
    ref = float_outputs(float_model, batches) if reference is None else reference
    metric = choose_metric(metric, False, ref)
    per = {}
    for name in probe.names:
        probe.quantize_only(name, with_input=not weights_only)
        per[name] = _mean_div(ref, probe.outputs(batches), metric)
    probe.configure(dict(probe.w_quant), [] if weights_only else probe.act_layers)
    total = _mean_div(ref, probe.outputs(batches), metric)
    probe.configure()
    ranking = sorted(per, key=per.__getitem__, reverse=True)
    add = sum(per.values()) / total if total > 0 else float("nan")
    return Sensitivity(metric=metric, layers=per, ranking=ranking, all_layers=total, additivity=add,
                       weights_only=weights_only)


def bit_sensitivity(float_model: nn.Module, q: nn.Module, batches: Iterable, bits: Iterable[int] = (2, 3, 4, 6, 8),
                    metric: str = "kl", probe: Probe | None = None,
                    reference: torch.Tensor | None = None) -> dict[str, dict[int, float]]:
    """``{layer: {b: divergence with only this layer's weight at b bits}}`` (inputs float).

    The weight keeps its layer's granularity and range method; only the bit width changes.
    """
    batches = as_batch_list(batches)
    bits = sorted({_check_bits(b) for b in bits})
    if not bits:
        raise ValueError("bits is empty: pass candidate bit widths such as (2, 3, 4, 6, 8)")
    probe = probe or Probe(float_model, q)
    ref = float_outputs(float_model, batches) if reference is None else reference
    metric = choose_metric(metric, False, ref)
    out: dict[str, dict[int, float]] = {}
    for name in probe.names:
        out[name] = {}
        for b in bits:
            w = weight_at_bits(probe.layers[name], probe.w_float[name], b)
            probe.configure({name: w})
            out[name][b] = _mean_div(ref, probe.outputs(batches), metric)
    probe.configure()
    return out


def _check_bits(b: object) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16:
        raise ValueError(f"bits must hold integers in 2..16, got {b!r}")
    return b
