"""Error anatomy: where each layer's quantization error comes from.

For a tensor ``x`` on a grid with step ``s`` the squared error splits into *clipping* (elements
outside the range, saturated to the end codes) and *rounding* (the rest, about ``s^2/12`` each);
see :func:`lowbit.ops.quant_error`. Shrinking the range trades one for the other: the *clip sweep*
measures both for ranges ``r * R_max`` (``R_max`` the max-abs range, or the min/max range of an
affine grid, per row of the granularity) over ratios ``r``, a U-shaped curve of the total; the
*chosen ratio* says where the layer's actual range sits on it (the median over rows of
``chosen width / full width``). Banner, Nahshan and Soudry, "Post-training 4-bit quantization of
convolutional networks for rapid deployment", NeurIPS 2019, derive the optimum of that curve.

The *error histogram* is the distribution of ``(x^ - x) / s``: uniform on ``[-1/2, 1/2]`` for
pure rounding error, with tails beyond where values were clipped.

For each quantized layer, the weight is analysed in its GEMM view ``[out, in*k]`` and the layer's
input (what its activation quantizer sees in the quantized model) on the analysis batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import ops
from ..modules import ActQuantizer, QuantLayer, WeightQuantizer
from ..ops.params import broadcast_param, to_rows
from ..ops.qparams import finite_minmax
from ..spec import PerChannel, PerTensor, QuantSpec
from .batches import run_batch
from .probe import weight_pairs

__all__ = ["TensorAnatomy", "LayerAnatomy", "tensor_anatomy", "clip_sweep", "error_anatomy",
           "DEFAULT_RATIOS", "HIST_EDGES"]

DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 21))
HIST_EDGES = tuple(round(-2.0 + 0.1 * i, 1) for i in range(41))   # (x^ - x) / s in [-2, 2]
MAX_ACT_ELEMENTS = 1 << 18
SWEEP_ELEMENTS = 1 << 16


@dataclass
class TensorAnatomy:
    """Error anatomy of one quantized tensor (see the module docstring).

    ``error``: ``QuantError.as_dict()`` (mse, clip_mse, round_mse, clip_fraction, sqnr_db) of the
    chosen grid; ``mse_used``: mean squared difference to the values the model really uses (differs
    from ``error.mse`` when an algorithm such as GPTQ changed the rounding); ``sweep``: ``{"ratio",
    "mse", "clip_mse", "round_mse", "clip_fraction"}`` lists; ``histogram``: ``{"edges", "counts",
    "below", "above"}``.
    """

    spec: str
    numel: int
    error: dict[str, float]
    chosen_ratio: float
    sweep: dict[str, list[float]]
    histogram: dict[str, Any]
    mse_used: float | None = None

    @property
    def best_ratio(self) -> float:
        """The sweep's ratio with the lowest total mse."""
        i = min(range(len(self.sweep["mse"])), key=self.sweep["mse"].__getitem__)
        return self.sweep["ratio"][i]


@dataclass
class LayerAnatomy:
    """Weight and input anatomy of one quantized layer (``input`` is None if it is not quantized)."""

    name: str
    weight: TensorAnatomy
    input: TensorAnatomy | None = None
    notes: list[str] = field(default_factory=list)


def _full_range(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = finite_minmax(rows)
    if spec.symmetric:
        r = torch.maximum(lo.abs(), hi.abs())
        return -r, r
    return torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))


def _subsample(x: torch.Tensor, spec: QuantSpec, limit: int) -> torch.Tensor:
    """At most about ``limit`` elements of ``x`` for the sweep, keeping whole rows of the granularity."""
    if x.numel() <= limit:
        return x
    if isinstance(spec.granularity, PerTensor):
        return x.reshape(-1)[:: -(-x.numel() // limit)]
    if isinstance(spec.granularity, PerChannel) and x.dim() == 2 and spec.granularity.axis in (0, -2):
        return x[:, :: -(-x.numel() // limit)]
    return x


def clip_sweep(x: torch.Tensor, spec: QuantSpec, ratios=DEFAULT_RATIOS) -> dict[str, list[float]]:
    """mse / clip_mse / round_mse / clip_fraction of ``x`` for ranges ``ratio * R_max``.

    :func:`lowbit.ops.clip_sweep` as lists; tensors larger than ``SWEEP_ELEMENTS`` are swept on a
    strided subsample (whole rows kept).
    """
    spec = spec.replace(rounding="nearest", dynamic=False)
    sweep = ops.clip_sweep(_subsample(x, spec, SWEEP_ELEMENTS), spec, ratios).as_dict()
    sweep["ratio"] = sweep.pop("ratios")
    return sweep


def _chosen_ratio(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor) -> float:
    rows = to_rows(x.detach().to(torch.float64), spec)
    lo, hi = _full_range(rows, spec)
    full = (hi - lo) / (2.0 if spec.symmetric else 1.0)
    s = scale.detach().to(torch.float64).reshape(-1)
    width = s * spec.number_format.steps_in_range(spec)   # for FP8/NF4/MX: s * the format's max value
    ok = full > 0
    if not bool(ok.any()):
        return 1.0
    width = width.expand_as(full) if width.numel() == 1 else width
    return float((width[ok] / full[ok]).median())


def _histogram(x: torch.Tensor, spec: QuantSpec, scale, zero_point) -> dict[str, Any]:
    x64 = x.detach().to(torch.float64)
    s = broadcast_param(torch.as_tensor(scale).to(torch.float64), x.shape, spec)
    xq = ops.fake_quantize(x64, spec, scale.to(torch.float64), zero_point)
    u = ((xq - x64) / s).reshape(-1)
    u = u[torch.isfinite(u)]
    edges = torch.tensor(HIST_EDGES, dtype=torch.float64)
    counts = torch.histc(u.clamp(edges[0], edges[-1]), bins=len(edges) - 1, min=float(edges[0]), max=float(edges[-1]))
    return {"edges": list(HIST_EDGES), "counts": [int(c) for c in counts.tolist()],
            "below": int((u < edges[0]).sum()), "above": int((u > edges[-1]).sum())}


def tensor_anatomy(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor,
                   ratios=DEFAULT_RATIOS, used: torch.Tensor | None = None) -> TensorAnatomy:
    """Error, clip sweep, chosen ratio and error histogram of ``x`` on ``(scale, zero_point)``."""
    spec = spec.replace(rounding="nearest", dynamic=False)
    err = ops.quant_error(x, spec, scale, zero_point)
    mse_used = None if used is None else float((used.detach().double() - x.detach().double()).square().mean())
    return TensorAnatomy(spec=str(spec), numel=x.numel(), error=_finite(err.as_dict()),
                         chosen_ratio=_chosen_ratio(x, spec, scale, zero_point),
                         sweep=clip_sweep(x, spec, ratios), histogram=_histogram(x, spec, scale, zero_point),
                         mse_used=mse_used)


def _finite(d: dict[str, float]) -> dict[str, float]:
    return {k: (v if math.isfinite(v) else (1e9 if v > 0 else -1e9)) for k, v in d.items()}


def _weight_qparams(layer: QuantLayer, w_float: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if layer.frozen:
        return layer.weight_scale, layer.weight_zero_point
    return layer.weight_quant.qparams(layer.weight)


class _Capture:
    """Forward pre-hook keeping up to ``limit`` input values of an activation quantizer."""

    def __init__(self, limit: int) -> None:
        self.parts: list[torch.Tensor] = []
        self.count = 0
        self.limit = limit

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or self.count >= self.limit:
            return
        flat = x.detach().reshape(-1)[: self.limit - self.count]
        self.parts.append(flat.float().clone())
        self.count += flat.numel()


@torch.no_grad()
def error_anatomy(float_model: nn.Module, q: nn.Module, batches: list | None = None,
                  ratios=DEFAULT_RATIOS, max_act_elements: int = MAX_ACT_ELEMENTS) -> dict[str, LayerAnatomy]:
    """:class:`LayerAnatomy` of every quantized layer of ``q`` (inputs need ``batches``).

    Activations are analysed where the layer quantizes its input with a static per-tensor grid
    (the first ``max_act_elements`` values it sees); other cases are noted in ``notes``.
    """
    pairs = weight_pairs(float_model, q)
    out: dict[str, LayerAnatomy] = {}
    hooks, captures = [], {}
    for name, layer in _layers(q):
        wf, wq = pairs[name]
        gemm = WeightQuantizer.gemm_view(wf)
        scale, zp = _weight_qparams(layer, wf)
        w = tensor_anatomy(gemm, layer.weight_quant.spec, scale, zp, ratios, used=WeightQuantizer.gemm_view(wq))
        out[name] = LayerAnatomy(name, w)
        aq: ActQuantizer | None = layer.input_quant
        if aq is None or not aq.enabled:
            out[name].notes.append("input not quantized")
        elif aq.spec.dynamic or not isinstance(aq.spec.granularity, PerTensor) or not aq.calibrated:
            out[name].notes.append(f"input grid {aq.spec} not analysed (static per-tensor only)")
        elif batches:
            captures[name] = _Capture(max_act_elements)
            hooks.append(aq.register_forward_pre_hook(captures[name]))
    if captures:
        was = q.training
        q.eval()
        try:
            for b in batches:
                run_batch(q, b)
        finally:
            q.train(was)
            for h in hooks:
                h.remove()
        for name, cap in captures.items():
            if not cap.parts:
                out[name].notes.append("input saw no data")
                continue
            aq = dict(_layers(q))[name].input_quant
            x = torch.cat(cap.parts)
            out[name].input = tensor_anatomy(x, aq.spec, aq.scale.reshape(()), aq.zero_point.reshape(()), ratios)
    return out


def _layers(q: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in q.named_modules() if isinstance(m, QuantLayer)]
