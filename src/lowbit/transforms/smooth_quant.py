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
from ..modules import QuantLayer, float_gemm_weight, is_linear_like, linear_features
from ..modules.tree import set_module
from ..modules.sharing import tied_partners
from .dataflow import linear_layers, norm_offset, trace_linear_inputs
from .verify import check_preserved
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
        return linear_features(self.linear)[0]

    @property
    def out_features(self) -> int:
        return linear_features(self.linear)[1]


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
            raise ValueError(f"{arg} pattern {p!r} matches no nn.Linear (or Conv1D) layer; linear layers are named like {names[:4]}")
    return pats


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor, linears: list[nn.Module], offset: float = 0.0) -> None:
    """In place: ``norm``'s affine output divided by ``s`` per channel, each reader's weight columns times ``s``.

    The composition is unchanged: ``W diag(s) (y / s) = W y`` for the norm output ``y``. For a norm
    ``n(x) * (offset + w) + b`` (``offset = 1``: Gemma's ``x * (1 + w)``) the new weight is
    ``(offset + w) / s - offset``, so ``offset + w'`` is ``(offset + w) / s``.
    """
    w = norm.weight
    w.copy_((offset + w.float()) / s.float().to(w.device) - offset)
    if isinstance(getattr(norm, "bias", None), torch.Tensor):
        norm.bias.div_(s.to(norm.bias))
    for lin in linears:
        g = float_gemm_weight(lin)
        g.mul_(s.to(g))


@torch.no_grad()
def check_norm_fold(norm_name: str, norm: nn.Module, probe: torch.Tensor, before: torch.Tensor, s: torch.Tensor) -> None:
    """After :func:`fold_into_norm`: ``norm(probe) * s`` must equal the output before (else raise naming it)."""
    after = norm(probe).float() * s.float().to(probe.device)
    err = (after - before).abs().max().item()
    scale = max(before.abs().max().item(), 1e-12)
    if err > 1e-4 * scale:
        raise ValueError(f"folding a per-channel factor into {norm_name} ({type(norm).__name__}) changed its output by "
                         f"{err / scale:.2g} (relative): it does not compute n(x) * w + b nor n(x) * (1 + w) + b; "
                         f"pass exclude=[...] for the layers reading it, or explicit smoothing only")


def tied_layers(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Linear layers among ``names`` whose weight is tied to another module's parameter -> why they
    are left alone (scaling the weight in place would change the other module, e.g. an embedding)."""
    modules = dict(model.named_modules())
    out = {}
    for n in names:
        partners = tied_partners(model, modules[n])
        if partners:
            out[n] = (f"its weight is tied to {', '.join(partners)}; scaling it would change that too "
                      "(untie it first to smooth it)")
    return out


def foldable_norm(modules: dict, norm_name: str) -> tuple[float | None, str | None]:
    """``(offset, None)`` for a norm lowbit can fold into, else ``(None, why)``."""
    norm = modules[norm_name]
    if any(p is norm.weight for m in modules.values() if m is not norm for p in m.parameters(recurse=False)):
        return None, f"{norm_name}.weight is shared with another module"
    offset = norm_offset(norm)
    if offset is None:
        return None, f"{norm_name} ({type(norm).__name__}) computes neither n(x) * w + b nor n(x) * (1 + w) + b"
    return offset, None


def norm_probe(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A random input of ``norm`` and its output (float32), to check a fold with :func:`check_norm_fold`."""
    w = norm.weight
    x = torch.randn(4, w.numel(), generator=torch.Generator().manual_seed(1)).to(w.device, w.dtype)
    with torch.no_grad():
        return x, norm(x).float()


@torch.inference_mode(False)   # what it builds stays ordinary tensors when called inside inference_mode
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
    linear_names = [n for n, _ in linear_layers(out)]
    if not linear_names:
        raise ValueError("smooth_quant: model has no nn.Linear (or transformers Conv1D) layer to smooth")
    include = _patterns("include", include, linear_names)
    exclude = _patterns("exclude", exclude, linear_names)
    device = _batches.model_device(out)
    flow = trace_linear_inputs(out, data, lambda m, b: _batches.call(m, b, device))

    info = SmoothInfo(alpha=alpha)
    selected = []
    tied = tied_layers(out, linear_names)
    for name in linear_names:
        rec = flow.linears.get(name)
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if name in tied:
            info.skipped[name] = tied[name]
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
        offset, why_not = foldable_norm(modules, norm_name)
        if offset is None:
            log.info("smooth_quant: not folding into %s: %s", norm_name, why_not)
            continue
        act = flow.linears[group[0]].channel_max
        wmax = torch.stack([_column_max(float_gemm_weight(modules[n])) for n in group]).amax(0)
        s = smoothing_factors(act, wmax, alpha)
        probe, before = norm_probe(modules[norm_name])
        fold_into_norm(modules[norm_name], s, [modules[n] for n in group], offset)
        check_norm_fold(norm_name, modules[norm_name], probe, before, s)
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
        g = float_gemm_weight(lin)
        s = smoothing_factors(rec.channel_max, _column_max(g), alpha)
        with torch.no_grad():
            g.mul_(s.to(g))
        set_module(out, name, SmoothedLinear(lin, s.to(g.device)))
        info.layers[name] = SmoothedLayer("explicit", outlier_ratio(rec.channel_max),
                                          outlier_ratio(rec.channel_max / s))
    log.info("smooth_quant: %d linear layers smoothed (%d folded, %d explicit), %d skipped",
             len(info.layers), len(folded), len(info.layers) - len(folded), len(info.skipped))
    check_preserved(model, out, data[0], lambda m, b: _batches.call(m, b, device), "smooth_quant",
                    sorted(info.layers))
    out.lowbit_smoothing = info
    return out


register_transform("smooth_quant", "float", lambda m, batches, **o: smooth_quant(m, batches, **o))
