"""``lb.save``: a quantized model to safetensors plus its quantization map (see :mod:`lowbit.checkpoint`)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..modules import ActQuantizer, QuantEmbedding, QuantLayer, WeightQuantizer
from ..quantize import QuantInfo, quant_embeddings, quant_layers
from ..spec import QuantSpec
from ..transforms.smooth_quant import SmoothedLinear
from .atomic import atomic_write
from .compact import compact
from .fileformat import BUFFER_PREFIX, FORMAT_VERSION, META_KEY, dtype_name, spec_to_dict

__all__ = ["save"]

log = logging.getLogger(__name__)


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    return safetensors.torch.save(tensors, metadata=metadata)


class _SpecTable:
    """Each distinct spec once, in ``qmap["specs"]``; entries refer to it by index (keeps the header small)."""

    def __init__(self) -> None:
        self.specs: list[QuantSpec] = []

    def ref(self, spec: QuantSpec | None) -> int | None:
        if spec is None:
            return None
        if spec not in self.specs:
            self.specs.append(spec)
        return self.specs.index(spec)


def _quantizer_entry(qz, table: _SpecTable, extra: dict) -> dict:
    return {"spec": table.ref(qz.spec), "observer": qz.observer if isinstance(qz, WeightQuantizer) else qz.observer_name,
            "options": qz.observer_options, "ste": qz.ste, "enabled": qz.enabled, **extra}


def _layer_entry(layer: QuantLayer, table: _SpecTable) -> dict:
    aq = layer.input_quant
    return {
        "class": type(layer).__name__,
        "float_class": layer.float_type.__name__,
        "weight_shape": list(layer._weight_shape),
        "frozen": bool(layer.frozen),
        "bias": layer.bias is not None,
        "weight": _quantizer_entry(layer.weight_quant, table, {"fixed": bool(layer.weight_quant.fixed)}),
        "activation": None if aq is None else _quantizer_entry(aq, table, {"qparams": aq.scale is not None}),
    }


def _embedding_entry(table: QuantEmbedding, spec_table: _SpecTable) -> dict:
    return {"class": type(table).__name__, "float_class": table.float_type.__name__,
            "weight_shape": list(table._weight_shape), "frozen": bool(table.frozen),
            "weight": _quantizer_entry(table.weight_quant, spec_table, {"fixed": bool(table.weight_quant.fixed)})}


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _collect(q: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    layers = {name: layer for name, layer in quant_layers(q) + quant_embeddings(q)}
    state = q.state_dict(keep_vars=False)
    tensors: dict[str, torch.Tensor] = {}
    implied, casts, aliases, seen = {}, {}, {}, {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                            "lb.save writes tensors only (safetensors)")
        owner, _, attr = key.rpartition(".")
        layer_name, _, sub = owner.rpartition(".") if owner.endswith(("weight_quant", "input_quant")) else (owner, "", "")
        layer = layers.get(layer_name)
        if layer is not None and sub == "weight_quant" and not layer.weight_quant.fixed:
            continue  # a cache of the weight's grid: refitted from the master weight on load
        spec = None
        if layer is not None and attr == "weight_zero_point" and not sub:
            spec = layer.weight_quant.spec
        elif layer is not None and attr == "zero_point" and sub:
            spec = (layer.weight_quant if sub == "weight_quant" else layer.input_quant).spec
        if spec is not None:
            z0 = spec.symmetric_zero_point
            if spec.symmetric and value.numel() and bool((value == z0).all()):
                implied[key] = {"value": z0, "shape": list(value.shape), "dtype": dtype_name(value.dtype)}
                continue
            if value.dtype != spec.storage_dtype:
                casts[key] = dtype_name(value.dtype)
                value = value.to(spec.storage_dtype)
        sk = _storage_key(value)
        if value.numel() and sk in seen:
            aliases[key] = seen[sk]
            continue
        seen[sk] = key
        tensors[key] = value.detach().to("cpu").contiguous()
    buffers = _non_persistent_buffers(q)
    for key, value in buffers.items():
        tensors[BUFFER_PREFIX + key] = value.detach().to("cpu").contiguous()
    return tensors, {"implied": implied, "casts": casts, "aliases": aliases, "buffers": sorted(buffers)}


def _non_persistent_buffers(q: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own non-persistent buffers (e.g. rotary ``inv_freq``), which ``state_dict`` leaves
    out: saved so that ``lb.load`` can fill them on a model built on the ``meta`` device. The
    run-time buffers of quantized layers are derived from their codes and are not saved."""
    out = {}
    for name, module in q.named_modules():
        if isinstance(module, (QuantLayer, QuantEmbedding)):
            continue
        for b in getattr(module, "_non_persistent_buffers_set", ()):
            t = module._buffers.get(b)
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                out[f"{name}.{b}" if name else b] = t
    return out


def save(q: nn.Module, path: str | os.PathLike) -> Path:
    """Write the quantized model ``q`` to ``path`` (safetensors + quantization map); returns the path.

    See :mod:`lowbit.checkpoint` for the format and for what saving an un-frozen model means.
    The write is atomic: on failure the previous file at ``path`` (if any) is left as it was.
    """
    if not isinstance(q, nn.Module):
        raise TypeError(f"q must be a torch.nn.Module, got {type(q).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if Path(path).is_dir():
        raise ValueError(f"path {str(path)!r} is a directory; pass the checkpoint file to write, e.g. "
                         f"{str(Path(path) / 'model.safetensors')!r}")
    layers = quant_layers(q)
    tables = quant_embeddings(q)
    if not layers and not tables:
        raise ValueError("q has no quantized layer: quantize it with lb.quantize first "
                         "(to save a float model use safetensors.torch.save_file(model.state_dict(), path))")
    observing = [n for n, m in q.named_modules() if isinstance(m, ActQuantizer) and m.observing]
    if observing:
        raise ValueError(f"q is being calibrated ({observing[0]} is observing); call lb.save after the "
                         "`with lb.calibrate(q):` block")
    unfrozen = [n for n, layer in layers + tables if not layer.frozen]
    if unfrozen:
        log.warning("lowbit: %d of %d quantized layers are not frozen (%s...): saving their float master weights; "
                    "call lb.freeze(q) first for a compact integer checkpoint", len(unfrozen), len(layers + tables),
                    unfrozen[0])
    tensors, metadata = payload(q)
    data = _serialize(tensors, metadata)
    atomic_write(path, data)
    return Path(path)


def payload(q: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the safetensors metadata (quantization map) ``save`` writes for ``q``, without
    the checks on ``q`` (used by the streaming writer for parts of a model, some of them float)."""
    layers = quant_layers(q)
    tables = quant_embeddings(q)
    from .. import __version__  # the package root is imported by the time anyone calls save

    info: QuantInfo | None = getattr(q, "lowbit_info", None)
    tensors, extra = _collect(q)
    table = _SpecTable()
    qmap = {
        "format": "lowbit", "format_version": FORMAT_VERSION, "lowbit_version": __version__,
        "model_class": type(q).__qualname__, "training": bool(q.training),
        "fold_bn": bool(info is not None and info.folded),
        "folded": [list(p) for p in info.folded] if info is not None else [],
        "info": None if info is None else {
            "weights": table.ref(info.weights), "activations": table.ref(info.activations),
            "observer": info.observer, "skipped": dict(info.skipped), "uncalibrated": list(info.uncalibrated)},
        "layers": {name: _layer_entry(layer, table) for name, layer in layers},
        "embeddings": {name: _embedding_entry(t, table) for name, t in tables},
        **extra,
    }
    smoothed = [n for n, m in q.named_modules() if isinstance(m, SmoothedLinear)]
    if smoothed:   # explicit SmoothQuant/AWQ factors: lb.load re-creates these wrappers on a plain model
        qmap["smoothed"] = smoothed
    if tables and info is not None and info.embeddings is not None:
        qmap["info"]["embeddings"] = table.ref(info.embeddings)
    qmap["specs"] = [spec_to_dict(spec) for spec in table.specs]
    try:
        meta = json.dumps(compact(qmap), separators=(",", ":"))
    except TypeError as e:
        raise TypeError(f"the quantization map is not JSON-serializable ({e}); observer_options must hold "
                        "plain numbers, strings, lists and dicts") from e
    return tensors, {"format": "lowbit", META_KEY: meta}
