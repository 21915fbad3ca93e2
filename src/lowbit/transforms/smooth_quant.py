"""SmoothQuant: move activation outliers into the weights, so per-tensor int8 activations work.

Xiao, Lin, Seznec, Wu, Demouth, Han 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models" (ICML). A linear layer ``Y = X W^T`` is unchanged by a
per-input-channel factor ``s``::

    Y = (X diag(s)^-1) (W diag(s))^T

Transformer activations have a few channels ``j`` with a far larger range ``max|X_j|`` than the
rest, so one per-tensor activation scale wastes the grid; weights are flat. Choosing

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)          (alpha in [0, 1], default 0.5)

splits the difficulty: the smoothed activation channel ranges become ``max|X_j|^(1-alpha)
max|W_j|^(1-alpha)``, the weight column ranges ``max|X_j|^alpha max|W_j|^alpha``. ``max|X_j|``
is measured on calibration batches over all tokens.

Where ``X diag(s)^-1`` is computed:

* **folded** (the paper's way): when ``X`` is the output of a LayerNorm/RMSNorm read *only* by
  linear layers (a pre-LN transformer's Q/K/V projections, or its FFN up-projection), ``1/s`` is
  folded into the norm's ``gamma`` and ``beta``; all readers share one ``s`` (``max|W_j|`` over
  their weights together). No extra work at inference.
* **explicit** (``explicit=True``, the default): otherwise (a post-LN transformer such as BERT /
  MiniLM, whose norm output is also the residual branch; an FFN down-projection after GELU; an
  attention output projection) the layer becomes a :class:`SmoothedLinear`:
  ``linear(x * (1/s))`` with ``W diag(s)``, its own ``s`` from its own weights. The extra cost is
  one elementwise multiply of the layer's input (an ONNX ``Mul``), small beside the GEMM.
  With ``explicit=False`` such layers are left alone and listed in ``info.skipped``.

Which norm output each linear layer reads, and who else reads it, is traced on the calibration
batches (:mod:`lowbit.transforms.dataflow`); nothing is assumed from module names.

The result is a float model computing the same function (to float rounding); ``lb.quantize`` then
quantizes ``SmoothedLinear.linear`` as usual. ``model.lowbit_smoothing`` (a :class:`SmoothInfo`)
records, per layer, how it was smoothed and its outlier ratio ``max_j m_j / median_j m_j``
(``m_j = max|X_j|``) before and after (computed from the calibration statistics).
"""
from __future__ import annotations

import copy
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import batches as _batches
from ..modules import QuantLayer
from ..modules.tree import set_module
from .dataflow import trace_linear_inputs
from .pipeline import register_transform

__all__ = ["smooth_quant", "smoothing_factors", "SmoothedLinear", "ChannelScale", "SmoothInfo",
           "SmoothedLayer", "outlier_ratio"]

log = logging.getLogger(__name__)


class ChannelScale(nn.Module):
    """``y = x * factor`` with one factor per channel of the last dimension (a buffer)."""

    def __init__(self, factor: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("factor", factor.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"channels={self.factor.numel()}"


class SmoothedLinear(nn.Module):
    """``linear(x * (1/s))`` whose ``linear`` holds ``W diag(s)``: an explicit SmoothQuant factor.

    ``weight``, ``bias``, ``in_features`` and ``out_features`` read through to ``linear`` (code
    that inspects a projection's weight keeps working).
    """

    def __init__(self, linear: nn.Module, s: torch.Tensor) -> None:
        super().__init__()
        self.smooth = ChannelScale((1.0 / s).to(linear.weight.dtype))
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.smooth(x))

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features


@dataclass
class SmoothedLayer:
    """How one linear layer was smoothed (``how``: ``"folded into <norm>"`` or ``"explicit"``)."""

    how: str
    outlier_ratio_before: float
    outlier_ratio_after: float


@dataclass
class SmoothInfo:
    """What :func:`smooth_quant` did (``model.lowbit_smoothing``)."""

    alpha: float
    layers: dict[str, SmoothedLayer] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)   # linear name -> why it was not smoothed

    def as_dict(self) -> dict:
        return {"alpha": self.alpha, "skipped": dict(self.skipped),
                "layers": {n: vars(v).copy() for n, v in self.layers.items()}}


def outlier_ratio(channel_max: torch.Tensor) -> float:
    """``max_j m_j / median_j m_j`` of per-channel ranges ``m`` (inf if the median is 0)."""
    m = channel_max.detach().float().flatten()
    med = m.median().item()
    return float("inf") if med == 0 else m.max().item() / med


def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = act_max_j^alpha / weight_max_j^(1-alpha)``; 1 where either range is 0 (float32)."""
    a, w = act_max.float(), weight_max.float()
    s = a.clamp_min(1e-12).pow(alpha) / w.clamp_min(1e-12).pow(1.0 - alpha)
    return torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))


def _column_max(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().float().amax(0)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (the paper uses 0.5; larger moves more of the "
                         f"activation range into the weights), got {alpha!r}")
    return float(alpha)


def _patterns(arg: str, pats, names: list[str]) -> list[str] | None:
    if pats is None:
        return None
    pats = [pats] if isinstance(pats, str) else list(pats)
    for p in pats:
        if not isinstance(p, str):
            raise TypeError(f"{arg} must be glob patterns over linear layer names (strings), got {p!r}")
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ValueError(f"{arg} pattern {p!r} matches no nn.Linear; linear layers are named like {names[:4]}")
    return pats


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor, linears: list[nn.Module]) -> None:
    """In place: ``norm``'s affine output divided by ``s`` per channel, each reader's weight columns times ``s``.

    The composition is unchanged: ``W diag(s) (y / s) = W y`` for the norm output ``y``.
    """
    norm.weight.div_(s.to(norm.weight))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight))


def smooth_quant(model: nn.Module, batches: Iterable, alpha: float = 0.5, *, explicit: bool = True,
                 include: Sequence[str] | str | None = None,
                 exclude: Sequence[str] | str | None = None) -> nn.Module:
    """A SmoothQuant-transformed copy of the float ``model`` (see the module docstring).

    Args:
        batches: calibration inputs (see :mod:`lowbit.batches`); ``max|X_j|`` is taken over all.
        alpha: migration strength in [0, 1]: at 1 every smoothed activation channel has range 1
            (all of the spread moves into the weights), at 0 every weight column has range 1.
        explicit: smooth linear layers whose input cannot be folded with an explicit
            :class:`SmoothedLinear` (True) or leave them as they are (False).
        include / exclude: glob patterns over ``nn.Linear`` names selecting the layers to smooth.

    The copy computes the same function as ``model`` and carries ``lowbit_smoothing``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("smooth_quant acts on the float model: apply it before lb.quantize "
                         "(recipes do: transforms=('smooth_quant',))")
    alpha = _check_alpha(alpha)
    if not isinstance(explicit, bool):
        raise TypeError(f"explicit must be a bool, got {explicit!r}")
    data = _batches.as_batches(batches)
    out = copy.deepcopy(model)
    linear_names = [n for n, m in out.named_modules() if type(m) is nn.Linear]
    if not linear_names:
        raise ValueError("smooth_quant: model has no nn.Linear layer to smooth")
    include = _patterns("include", include, linear_names)
    exclude = _patterns("exclude", exclude, linear_names)
    device = _batches.model_device(out)
    flow = trace_linear_inputs(out, data, lambda m, b: _batches.call(m, b, device))

    info = SmoothInfo(alpha=alpha)
    selected = []
    for name in linear_names:
        rec = flow.linears.get(name)
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if rec is None or rec.channel_max is None:
            info.skipped[name] = "no calibration batch reached it"
            continue
        selected.append(name)
    modules = dict(out.named_modules())

    # 1. fold into norms whose output only the selected linear layers read
    readers = flow.readers()
    folded: set[str] = set()
    for norm_name, group in readers.items():
        if not flow.foldable(norm_name, group) or not all(n in selected for n in group):
            continue
        act = flow.linears[group[0]].channel_max
        wmax = torch.stack([_column_max(modules[n].weight) for n in group]).amax(0)
        s = smoothing_factors(act, wmax, alpha)
        fold_into_norm(modules[norm_name], s, [modules[n] for n in group])
        for n in group:
            info.layers[n] = SmoothedLayer(f"folded into {norm_name}", outlier_ratio(act), outlier_ratio(act / s))
            folded.add(n)

    # 2. the others: explicit factor, or left alone
    for name in selected:
        if name in folded:
            continue
        rec = flow.linears[name]
        others = sorted(set().union(*(flow.other_readers.get(p, set()) for p in rec.producers if p)))
        why = (f"its input is also read by {', '.join(others)}" if others
               else "its input does not come from a LayerNorm/RMSNorm read only by linear layers")
        if not explicit:
            info.skipped[name] = f"not foldable ({why}); explicit=False"
            continue
        lin = modules[name]
        s = smoothing_factors(rec.channel_max, _column_max(lin.weight), alpha)
        with torch.no_grad():
            lin.weight.mul_(s.to(lin.weight))
        set_module(out, name, SmoothedLinear(lin, s.to(lin.weight.device)))
        info.layers[name] = SmoothedLayer("explicit", outlier_ratio(rec.channel_max),
                                          outlier_ratio(rec.channel_max / s))
    log.info("smooth_quant: %d linear layers smoothed (%d folded, %d explicit), %d skipped",
             len(info.layers), len(folded), len(info.layers) - len(folded), len(info.skipped))
    out.lowbit_smoothing = info
    return out


register_transform("smooth_quant", "float", lambda m, batches, **o: smooth_quant(m, batches, **o))
