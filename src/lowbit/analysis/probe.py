"""Float and quantized weights of a quantized model, and a probe that quantizes chosen layers only.

Analyses compare a quantized layer with its float original. Before ``lb.freeze`` a
:class:`~lowbit.modules.QuantLayer` keeps the float weight as the master copy; after it only the
integer codes remain, so the float weight is recovered from the float model (with the BatchNorm
folding that ``lb.quantize`` applied, recorded in ``q.lowbit_info.folded``).

:class:`Probe` is a private copy of the quantized model in which every layer's weight and input
quantization can be switched on or off on its own: "quantize one layer at a time, the others float"
(per-layer sensitivity) and "this layer at b bits" (mixed precision) are probe configurations.

With only some layers quantized, every module that finishes before the first of them starts
computes exactly what it computes in the float model. :meth:`Probe.outputs` records those
outputs once per batch and then skips the modules (their ``forward`` returns the recorded
value), so a layer deep in the network costs only the part of the network after it.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from .. import ops
from ..modules import QuantLayer, WeightQuantizer, float_gemm_weight
from ..quantize import quant_layers
from ..transforms.dataflow import norm_offset
from ..transforms.fold_bn import fold_batchnorm
from ..transforms.smooth_quant import SmoothedLinear
from .batches import output_tensor, run_batch

__all__ = ["weight_pairs", "weight_at_bits", "Probe"]


def _check_models(float_model: nn.Module | None, q: nn.Module) -> list[tuple[str, QuantLayer]]:
    if float_model is None:
        layers = quant_layers(q) if isinstance(q, nn.Module) else None
        pinned = [n for n, layer in layers or [] if layer.frozen or layer.weight_quant.fixed]
        if pinned:
            raise ValueError(f"float_model=None needs every layer's master weight to be its float weight, but "
                             f"{pinned[:3]} are frozen or have a pinned grid (GPTQ); pass the float model")
    elif not isinstance(float_model, nn.Module):
        raise TypeError(f"float_model must be a torch.nn.Module, got {type(float_model).__name__}")
    if not isinstance(q, nn.Module):
        raise TypeError(f"q must be a torch.nn.Module (from lb.quantize), got {type(q).__name__}")
    if float_model is not None and any(isinstance(m, QuantLayer) for m in float_model.modules()):
        raise ValueError("float_model is already quantized; pass the original float model first and the "
                         "quantized model (from lb.quantize) second")
    layers = quant_layers(q)
    if not layers:
        raise ValueError("q has no quantized layer; pass the model returned by lb.quantize(float_model, ...)")
    return layers


def weight_pairs(float_model: nn.Module | None, q: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (float weight, quantized weight)}`` for every quantized layer of ``q``.

    The float weight is the one the quantized layer started from (BatchNorm folded in, if
    ``lb.quantize`` folded it); the quantized weight is what the layer's forward uses
    (fake-quantized, or dequantized once frozen). Both have the layer's weight shape, detached.

    Where the layer's master weight no longer is the float weight (frozen; or a pinned grid:
    GPTQ rewrote the master weight onto the grid, QAT trained it), the float weight is taken from
    ``float_model`` (with SmoothQuant/AWQ factors applied, see :func:`_reference_weight`); a frozen
    layer without a matching weight there is an error, a pinned one falls back to its master weight.
    ``float_model=None`` is allowed while no layer is frozen or pinned (the master weights are the float ones).
    """
    layers = _check_models(float_model, q)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ref = None
    if any(layer.frozen or layer.weight_quant.fixed for _, layer in layers):
        try:
            ref = _folded_reference(float_model, q)
        except ValueError:
            if any(layer.frozen for _, layer in layers):
                raise
    with torch.no_grad():
        for name, layer in layers:
            wq = layer.quantized_weight().detach()
            wf = None
            if layer.frozen or layer.weight_quant.fixed:
                wf = _reference_weight(ref, q, name, tuple(wq.shape)) if ref is not None else None
                if wf is None and layer.frozen:
                    raise ValueError(f"layer {name!r} of q is frozen and float_model has no matching weight "
                                     "there; pass the float model q was made from (or analyze before lb.freeze)")
                wf = None if wf is None else wf.detach().to(wq.device)
            if wf is None:
                wf = layer.weight.detach()
            out[name] = (wf, wq)
    return out


def _reference_weight(ref: nn.Module, q: nn.Module, name: str, shape: tuple) -> torch.Tensor | None:
    """The float weight of ``q``'s layer ``name`` in the float model ``ref`` (BatchNorm folded), or None.

    SmoothQuant/AWQ (:mod:`lowbit.transforms`) quantize ``W diag(s)`` instead of ``W``: an explicit
    factor sits in the :class:`~lowbit.transforms.SmoothedLinear` around the layer (``1/s``), a
    folded one divided the norm that feeds it, so ``s = gamma_float / gamma_q``.
    """
    def weight_at(model: nn.Module, path: str):
        try:
            m = model.get_submodule(path)
        except AttributeError:
            return None
        w = float_gemm_weight(m) if isinstance(getattr(m, "weight", None), torch.Tensor) else None   # Conv1D: [out, in]
        return w.detach() if isinstance(w, torch.Tensor) and tuple(w.shape) == shape else None

    parent, _, leaf = name.rpartition(".")
    if leaf == "linear" and isinstance(q.get_submodule(parent), SmoothedLinear):
        w = weight_at(ref, parent)
        factor = q.get_submodule(parent).smooth.factor.detach()        # 1 / s
        return None if w is None else w / factor.to(w)
    w = weight_at(ref, name)
    if w is None:
        return None
    for info in (getattr(q, "lowbit_smoothing", None), getattr(q, "lowbit_awq", None)):
        layer = None if info is None else info.layers.get(name)
        if layer is not None and layer.how.startswith("folded into "):   # the norm holds every folded factor
            norm = layer.how.removeprefix("folded into ")
            offset = norm_offset(ref.get_submodule(norm)) or 0.0            # Gemma: x * (1 + gamma)
            gamma_f, gamma_q = ref.get_submodule(norm).weight.detach(), q.get_submodule(norm).weight.detach()
            return w * ((offset + gamma_f.float()) / (offset + gamma_q.float())).to(w)
    return w


def _folded_reference(float_model: nn.Module, q: nn.Module) -> nn.Module:
    ref = copy.deepcopy(float_model).eval()
    info = getattr(q, "lowbit_info", None)
    folded = [tuple(p) for p in getattr(info, "folded", [])]
    if folded:
        done = [tuple(p) for p in fold_batchnorm(ref)]
        if sorted(done) != sorted(folded):
            raise ValueError(f"q folded BatchNorm pairs {folded} but float_model folds to {done}; "
                             "pass the float model q was made from")
    return ref


def weight_at_bits(layer: QuantLayer, w_float: torch.Tensor, bits: int) -> torch.Tensor:
    """``w_float`` fake-quantized like ``layer`` does, but with ``bits`` bits (same granularity/observer)."""
    wq: WeightQuantizer = layer.weight_quant
    spec = wq.spec.replace(bits=bits, rounding="nearest")
    gemm = WeightQuantizer.gemm_view(w_float)
    with torch.no_grad():
        scale, zero_point = ops.choose_qparams(gemm, spec, wq.observer, **wq.observer_options)
        return ops.fake_quantize(gemm, spec, scale, zero_point).reshape(w_float.shape)


class _WeightSwitch(nn.Module):
    """Stands in for a layer's weight quantizer: returns ``value`` (a fixed weight) or the float weight."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.value is None else self.value


def _concat(outs: list[torch.Tensor]) -> torch.Tensor:
    """Outputs of all batches along the first dimension; batches whose shapes differ beyond the first
    dimension (a transformer's hidden states at different sequence lengths) as rows of the last dimension."""
    if len({tuple(o.shape[1:]) for o in outs}) <= 1:
        return torch.cat(outs)
    return torch.cat([o.reshape(-1, o.shape[-1]) if o.dim() > 1 else o.reshape(-1, 1) for o in outs])


class Probe:
    """A copy of ``q`` where each layer's weight/input quantization is switched on or off separately.

    Attributes:
        model: the private copy (float weights as master copies, quantizers switchable).
        names: quantized layer names in module order.
        w_float / w_quant: ``{name: tensor}``, the float and the quantized weight of each layer.
        layers: ``{name: the original QuantLayer of q}`` (for specs and observers).
    """

    def __init__(self, float_model: nn.Module | None, q: nn.Module) -> None:
        pairs = weight_pairs(float_model, q)
        self.layers = dict(quant_layers(q))
        self.names = list(self.layers)
        self.w_float = {n: p[0] for n, p in pairs.items()}
        self.w_quant = {n: p[1] for n, p in pairs.items()}
        self.model = copy.deepcopy(q).eval()
        self._switch: dict[str, _WeightSwitch] = {}
        self._acts: dict[str, Any] = {}
        for name, layer in quant_layers(self.model):
            if layer.frozen:
                for buf in ("weight_codes", "weight_scale", "weight_zero_point"):
                    delattr(layer, buf)
                layer.frozen = False
            layer.weight = nn.Parameter(self.w_float[name].clone(), requires_grad=False)
            self._switch[name] = layer.weight_quant = _WeightSwitch()
            aq = layer.input_quant
            if aq is not None and aq.enabled and aq.calibrated:
                self._acts[name] = aq
            elif aq is not None:
                aq.enabled = False
        self._order: dict[str, tuple[int, int]] | None = None   # module -> (start, end) in call order
        self._cache: dict[str, list] = {}
        self._cached_for: list | None = None
        self._skip: list[str] = []
        self._batch = 0
        self.configure()

    @property
    def act_layers(self) -> list[str]:
        """Layers whose input is quantized in ``q``."""
        return list(self._acts)

    def configure(self, weights: dict[str, torch.Tensor] | None = None, acts: Iterable[str] = ()) -> None:
        """Quantize the weights in ``weights`` (``{name: weight to use}``) and the inputs of ``acts``; all else float."""
        weights = weights or {}
        acts = set(acts)
        for name, sw in self._switch.items():
            sw.value = weights.get(name)
        for name, aq in self._acts.items():
            aq.enabled = name in acts
        self._active = set(weights) | acts
        self._config = (dict(weights), acts)

    def quantize_only(self, name: str, with_input: bool = True) -> None:
        """Layer ``name`` as in ``q`` (its weight and, if ``with_input``, its input); the others float."""
        self.configure({name: self.w_quant[name]}, [name] if with_input else [])

    @torch.no_grad()
    def outputs(self, batches: list) -> torch.Tensor:
        """The probe's outputs on ``batches``, concatenated along the first dimension (see :func:`_concat`)."""
        if self._cached_for is not batches:
            self._record(batches)
        first = min((self._order[n][0] for n in self._active if n in self._order), default=None)
        skip = [] if first is None else self._prefix(first)
        mods = dict(self.model.named_modules())
        for name in skip:
            mods[name].forward = self._replay(name)
        try:
            out = []
            for i, b in enumerate(batches):
                self._batch = i
                out.append(output_tensor(run_batch(self.model, b)).detach())
            return _concat(out)
        finally:
            for name in skip:
                del mods[name].forward

    def _replay(self, name: str):
        def forward(*args, **kwargs):
            return _clone(self._cache[name][self._batch])
        return forward

    def _prefix(self, first: int) -> list[str]:
        """The outermost cached modules that end before call number ``first`` starts."""
        done = [n for n in self._cache if self._order[n][1] < first]
        inside = set(done)
        return [n for n in done if not any(n.startswith(p + ".") for p in inside if p != n)]

    def _record(self, batches: list) -> None:
        """Run the float probe once, noting each module's call order and the outputs worth replaying."""
        config = self._config
        self.configure()
        names = {m: n for n, m in self.model.named_modules() if n}
        orders: list[dict[str, list[int]]] = []
        outs: dict[str, list] = {}
        counter = [0]

        def pre(m, args):
            n = names[m]
            if n in orders[-1]:
                orders[-1][n][0] = -1          # called twice: not replayable
            else:
                orders[-1][n] = [counter[0], -1]
            counter[0] += 1

        def post(m, args, out):
            n = names[m]
            orders[-1][n][1] = counter[0]
            counter[0] += 1
            outs.setdefault(n, []).append(_clone(out) if _cacheable(out) else None)

        hooks = [h for m in names for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
        try:
            for b in batches:
                orders.append({})
                counter[0] = 0
                run_batch(self.model, b)
        finally:
            for h in hooks:
                h.remove()
            self.configure(*config)
        self._cached_for = batches
        self._order = {n: (o[0], o[1]) for n, o in orders[0].items()}
        if any(o != orders[0] for o in orders[1:]):   # the call order depends on the input: replay nothing
            self._cache = {}
            return
        cache = {n: v for n, v in outs.items()
                 if self._order[n][0] >= 0 and len(v) == len(batches) and all(x is not None for x in v)}
        # keep only what some one-layer configuration replays, within a memory budget
        self._cache = cache
        keep = {n for layer in self.names if layer in self._order for n in self._prefix(self._order[layer][0])}
        self._cache = {n: cache[n] for n in keep}
        if sum(_nbytes(v) for v in self._cache.values()) > MAX_CACHE_BYTES:
            self._cache = {}


MAX_CACHE_BYTES = 1 << 30


def _nbytes(values: list) -> int:
    total = 0
    for out in values:
        for t in ([out] if isinstance(out, torch.Tensor) else out):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def _cacheable(out) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    return type(out) in (tuple, list) and all(o is None or isinstance(o, torch.Tensor) for o in out)


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    return type(out)(None if o is None else o.detach().clone() for o in out)
