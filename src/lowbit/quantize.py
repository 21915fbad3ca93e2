"""The model verbs: ``quantize`` a copy, ``calibrate`` its activations, ``freeze`` it to integers.

::

    q = lb.quantize(model, weights=lb.QuantSpec(bits=4, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(bits=8, symmetric=False), observer="mse")
    with lb.calibrate(q):
        for x in batches:
            q(x)
    lb.freeze(q)

``quantize`` deep-copies the model, folds BatchNorm into the layer before it, and swaps every
``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``, transformers ``Conv1D`` and their subclasses
(:mod:`lowbit.modules.layer_types`) selected by ``include``/``exclude`` for its quantized
counterpart (on every path that reaches it), which fake-quantizes its weight and (if
``activations`` is given) its input. Layers it cannot quantize stay float and are listed in
``q.lowbit_info.skipped``; ``q.lowbit_coverage`` (:mod:`lowbit.accounting`) lists every layer, settles
tied weights and names Linear-like layers left float at WARNING. With
``embeddings=spec`` every selected ``nn.Embedding`` becomes a weight-only
:class:`~lowbit.modules.QuantEmbedding` too (by default embeddings stay float).
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .accounting import account
from .modules import (LAYER_CLASSES, ActQuantizer, QuantEmbedding, QuantLayer, QuantLinear, check_embedding_spec,
                      make_quant_layer, quant_class_for)
from .modules.layer import weight_range_method
from .modules.layer_types import check_finite_weight
from .modules.linear import KERNELS
from .modules.sharing import share_frozen_codes, tied_quant_groups
from .modules.tree import replace_module
from .spec import PerChannel, QuantSpec
from .transforms.dataflow import is_norm
from .transforms.fold_bn import fold_batchnorm

__all__ = ["quantize", "calibrate", "freeze", "QuantInfo", "quant_layers", "frozen_quant_layers", "quant_embeddings", "DEFAULT_WEIGHTS"]

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = QuantSpec(bits=8, granularity=PerChannel(0))


@dataclass
class QuantInfo:
    """What ``lb.quantize`` did to a model (``q.lowbit_info``)."""

    weights: QuantSpec
    activations: QuantSpec | None
    observer: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # module name -> why it stayed float
    folded: list[tuple[str, str]] = field(default_factory=list)
    uncalibrated: list[str] = field(default_factory=list)
    embeddings: QuantSpec | None = None                       # grid of the quantized embedding tables
    quantized_embeddings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"weights": str(self.weights), "activations": None if self.activations is None else str(self.activations),
                "observer": self.observer, "quantized": list(self.quantized), "skipped": dict(self.skipped),
                "folded": [list(p) for p in self.folded], "uncalibrated": list(self.uncalibrated),
                "embeddings": None if self.embeddings is None else str(self.embeddings),
                "quantized_embeddings": list(self.quantized_embeddings)}


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """The quantized layers of ``model`` with their names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def frozen_quant_layers(q: nn.Module, verb: str) -> list[tuple[str, QuantLayer]]:
    """:func:`quant_layers` of ``q``, checked to be frozen; ``verb`` names the caller in the errors."""
    if not isinstance(q, nn.Module):
        raise TypeError(f"q must be a torch.nn.Module, got {type(q).__name__}")
    layers = quant_layers(q)
    if not layers:
        raise ValueError("q has no quantized layer: run lb.quantize, lb.calibrate and lb.freeze first")
    unfrozen = [n for n, layer in layers if not layer.frozen]
    if unfrozen:
        raise ValueError(f"layers {unfrozen[:5]} are not frozen: call lb.freeze(q) before {verb}")
    return layers


def quant_embeddings(model: nn.Module) -> list[tuple[str, QuantEmbedding]]:
    """The quantized embedding tables of ``model`` with their names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantEmbedding)]


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(arg: str, patterns, names: list[str]) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{arg} must be glob patterns (strings), got {p!r}")
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            sample = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise ValueError(f"{arg} pattern {p!r} matches no module; module names look like: {sample}")
    return patterns


def _layer_class(module: nn.Module, parent: nn.Module | None) -> tuple[type | None, str | None]:
    """The quantized class for ``module`` and None, or None and why it stays float."""
    if isinstance(parent, nn.MultiheadAttention):
        return None, "inside nn.MultiheadAttention, which reads the weights directly"
    cls, why = quant_class_for(module)
    if cls is None and why is None:
        why = _float_reason(module)
    return cls, why


def _float_reason(module: nn.Module) -> str:
    name = type(module).__name__
    if type(module) is nn.Embedding:
        return "Embedding table (pass embeddings=QuantSpec(...) to quantize it)"
    if isinstance(module, nn.Embedding):
        return f"{name} is an nn.Embedding subclass with its own forward; lowbit quantizes plain nn.Embedding tables"
    if is_norm(module) or isinstance(module, nn.modules.batchnorm._NormBase):
        return f"{name} is a normalization layer (not supported: it stays float, as in int8 inference engines)"
    kinds = ", ".join(cls.float_name for cls in LAYER_CLASSES)
    return f"{name} is not supported (lowbit quantizes {kinds} and their subclasses)"


@torch.inference_mode(False)   # what it builds stays ordinary tensors when called inside inference_mode
def quantize(model: nn.Module, weights: QuantSpec = DEFAULT_WEIGHTS, activations: QuantSpec | None = None,
             observer: str = "minmax", include: Sequence[str] | str | None = None,
             exclude: Sequence[str] | str | None = None, *, weight_observer: str | None = None,
             observer_options: dict | None = None, fold_bn: bool = True,
             embeddings: QuantSpec | None = None, inplace: bool = False) -> nn.Module:
    """A quantized copy of ``model`` (the float model is untouched), or ``model`` itself quantized
    with ``inplace=True`` (no second float model in memory: torchao's ``quantize_`` semantics).

    Args:
        weights: grid of the weights (default int8 per output channel).
        activations: grid of each quantized layer's input, or None for weight-only quantization.
            Static activations need ``lb.calibrate``; ``dynamic=True`` ones do not.
        observer: range estimator for activations and weights (``"minmax"``, ``"mse"``,
            ``"entropy"``, ``"percentile"``, ...); ``weight_observer`` overrides it for weights. With
            activations, ``observer_options`` are the activations' only, and a clipping observer
            (percentile, entropy, moving average) gives the weights min/max (see
            :func:`lowbit.modules.layer.weight_range_method`).
        include / exclude: glob patterns over module names (``"features.*"``, ``"classifier"``).
        fold_bn: fold BatchNorm into the preceding layer first.
        embeddings: grid of the ``nn.Embedding`` tables (weight-only, e.g.
            ``QuantSpec(bits=8, granularity=PerChannel(0))``: one scale per row), or None to keep
            them float. Their range method is the weights' one.
        inplace: quantize ``model`` itself instead of a deep copy. Every argument is checked
            before anything changes, so a call that raises leaves ``model`` as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(weights, QuantSpec):
        raise TypeError(f"weights must be a lowbit.QuantSpec, got {type(weights).__name__}")
    if activations is not None and not isinstance(activations, QuantSpec):
        raise TypeError(f"activations must be a lowbit.QuantSpec or None, got {type(activations).__name__}")
    if embeddings is not None:
        check_embedding_spec(embeddings)
    if any(isinstance(m, (QuantLayer, QuantEmbedding)) for m in model.modules()):
        raise ValueError("model is already quantized; pass the float model to lb.quantize")
    if quant_class_for(model)[0] is not None or type(model) is nn.Embedding:
        raise ValueError(f"model is a single {type(model).__name__}; lb.quantize replaces the layers inside a "
                         f"model: wrap it, e.g. lb.quantize(nn.Sequential(layer), ...)")
    names = [n for n, _ in model.named_modules() if n]
    include = _check_patterns("include", include, names)
    exclude = _check_patterns("exclude", exclude, names)

    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    q = model if inplace else copy.deepcopy(model)
    info = QuantInfo(weights=weights, activations=activations, observer=observer, embeddings=embeddings)
    if fold_bn:
        info.folded = fold_batchnorm(q)

    parents = {n: m for n, m in q.named_modules()}
    for name, module in list(q.named_modules()):
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue  # containers and parameter-free modules (ReLU, pooling, ...) need nothing
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        parent = parents.get(name.rpartition(".")[0]) if "." in name else q
        if embeddings is not None and type(module) is nn.Embedding:
            if module.max_norm is not None:
                info.skipped[name] = "nn.Embedding with max_norm (it renormalizes its table on every lookup)"
                continue
            check_finite_weight(name, module)
            replace_module(q, module, QuantEmbedding.from_float(
                module, embeddings, *weight_range_method(observer, weight_observer, observer_options, activations)))
            info.quantized_embeddings.append(name)
            continue
        cls, why = _layer_class(module, parent)
        if cls is None:
            info.skipped[name] = why
            continue
        check_finite_weight(name, module)
        replace_module(q, module, make_quant_layer(cls, module, weights, activations, observer,
                                                   weight_observer, observer_options))
        info.quantized.append(name)
    if not info.quantized and not info.quantized_embeddings:
        raise ValueError("no layer was quantized: the model has no nn.Linear/nn.Conv1d/nn.Conv2d selected by "
                         f"include/exclude (skipped: {info.skipped or 'none'})")
    q.lowbit_coverage = account(q, info.skipped, include, exclude)   # ties settled, float layers reported
    _keep_fused_paths_off(q)
    q.lowbit_info = info
    return q


def _keep_fused_paths_off(q: nn.Module) -> None:
    """``nn.TransformerEncoderLayer`` in eval mode runs a fused kernel that reads ``linear1.weight``
    (the float master weight) directly, bypassing the quantized layers' forward. PyTorch (2.4 to
    2.14) takes that path only when ``activation_relu_or_gelu`` is set, an attribute nothing else
    reads; clearing it keeps the layer module by module (its ``activation`` is unchanged)."""
    for m in q.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and any(isinstance(c, QuantLayer) for c in m.modules()):
            m.activation_relu_or_gelu = 0


def _act_quantizers(model: nn.Module) -> list[tuple[str, ActQuantizer]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, ActQuantizer) and m.enabled and not m.spec.dynamic]


@contextlib.contextmanager
def calibrate(model: nn.Module) -> Iterator[nn.Module]:
    """Collect activation statistics while the model runs inside the block; fix the ranges on exit.

    Runs in eval mode and without gradients. Raises ``ValueError`` on exit if no batch went
    through the model. Layers that saw no data (an unused branch) stay float and are listed
    in ``lowbit_info.uncalibrated``.
    """
    quantizers = _act_quantizers(model)
    if not any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("model has no quantized layer; call lb.quantize(model, ...) first")
    was_training = model.training
    model.eval()
    for _, aq in quantizers:
        aq.start_observing()
    ok = False
    try:
        with torch.no_grad():
            yield model
        ok = True
    finally:
        model.train(was_training)
        if not ok:
            for _, aq in quantizers:
                aq.observing = False
    missing = []
    for i, (name, aq) in enumerate(quantizers):
        try:
            with torch.inference_mode(False):   # ranges fixed inside inference_mode stay ordinary tensors
                done = aq.finish_observing()
            if not done:
                missing.append(name)
        except ValueError as e:   # an observer that saw only NaN/Inf: name the layer, leave no one observing
            for _, other in quantizers[i:]:
                other.observing = False
            raise ValueError(f"calibration of {name}: {e}") from e
    if quantizers and len(missing) == len(quantizers):
        raise ValueError("calibration saw no batch: run the model on calibration inputs inside "
                         "`with lb.calibrate(q): q(x)`")
    info = getattr(model, "lowbit_info", None)
    if info is not None:
        info.uncalibrated = missing
    if missing:
        log.warning("lowbit: %d activation quantizers saw no data and stay float: %s", len(missing), missing)


@torch.inference_mode(False)   # what it builds stays ordinary tensors when called inside inference_mode
def freeze(model: nn.Module, kernel: str = "auto") -> nn.Module:
    """Store every quantized weight as integer codes (in place); returns ``model``.

    Activation ranges must be calibrated first. The frozen model computes the same outputs as
    before in eval mode (it uses the same grid; grids learned by ``lb.qat`` become fixed ones), holds
    no float master weights (nor any float copy of them), and can be saved with ``lb.save``.

    ``kernel`` chooses how weight-only linear layers run small (decoding) inputs on CPU:
    ``"auto"`` runs PyTorch's int4/int8 kernels (activations rounded to bfloat16, float32
    accumulation: faster than float, not bit-identical to the fake-quantized model), and
    ``"dequantize"`` rebuilds the weight per call (exact; see :mod:`lowbit.modules.linear`).
    Calling ``freeze`` again on a frozen model only changes the kernel.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    layers = quant_layers(model)
    tables = quant_embeddings(model)
    if not layers and not tables:
        raise ValueError("model has no quantized layer; call lb.quantize(model, ...) first")
    info = getattr(model, "lowbit_info", None)
    skip = set(info.uncalibrated) if info is not None else set()
    for name, layer in layers:
        if layer.input_quant is not None and not layer.input_quant.calibrated and f"{name}.input_quant" not in skip:
            raise ValueError(f"layer {name!r}: input quantizer is not calibrated; run `with lb.calibrate(q): ...` "
                             "on some batches before lb.freeze")
    tied = tied_quant_groups([m for _, m in layers + tables])   # one tensor -> one set of codes
    for name, layer in layers:
        for attr in ("weight_quant", "input_quant"):  # QAT quantizers (lowbit.qat) hand over their learned grids
            qz = getattr(layer, attr)
            if qz is not None and hasattr(qz, "to_fixed"):
                setattr(layer, attr, qz.to_fixed())
        if layer.input_quant is not None and not layer.input_quant.calibrated:
            layer.input_quant.enabled = False
        layer.freeze()
        if isinstance(layer, QuantLinear):
            layer.set_kernel(kernel)
    for _, table in tables:
        table.freeze()
    share_frozen_codes(tied)
    return model
