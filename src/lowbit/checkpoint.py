"""Quantized checkpoints: ``lb.save(q, path)`` and ``lb.load(path, model_like)``.

The file is plain `safetensors <https://github.com/huggingface/safetensors>`_: every tensor of the
quantized model's ``state_dict`` as it is stored (integer weight codes, packed two or four per byte
for 4- and 2-bit grids; weight scales and zero points; activation scales and zero points; biases
and every float tensor of the layers that stayed float), plus a *quantization map* as JSON in the
header metadata (key ``"lowbit"``)::

    {"format": "lowbit", "format_version": 1, "lowbit_version": ..., "model_class": ...,
     "fold_bn": ..., "folded": [[layer, batchnorm], ...], "info": {...lb.quantize arguments...},
     "layers": {name: {"class", "float_class", "weight_shape", "frozen", "bias",
                       "weight": {"spec", "observer", "options", "ste", "enabled", "fixed"},
                       "activation": null | {"spec", "observer", "options", "ste", "enabled", "qparams"}}},
     "implied": {tensor: {"value", "shape", "dtype"}}, "casts": {tensor: dtype}, "aliases": {tensor: tensor}}

Zero points of symmetric grids (all equal to ``spec.symmetric_zero_point``) are not written
(``implied``); other zero points are written in the grid's own integer type (``casts`` restores
int32). Tensors that share memory (tied weights) are written once (``aliases``).

``lb.load`` rebuilds the quantized structure on a float model of the same architecture (BatchNorm
folded as recorded, each layer's weight and activation quantizers from the map), loads the tensors
and returns a model whose outputs are bit-identical to the saved one's.

**Un-frozen models** (fake quantization, e.g. QAT in progress) are saved as they are: float master
weights plus the quantizer state (activation qparams, pinned weight grids), flagged
``"frozen": false``; ``lb.load`` returns an un-frozen model that computes the same outputs and can
be trained further. Such a file is as large as the float model (a warning says so); call
``lb.freeze(q)`` first for a compact integer checkpoint.

Writing is atomic: the bytes go to a temporary file in the target's directory, are fsync'ed and
moved over the target with ``os.replace``, so a failed or interrupted save leaves the old file.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import secrets
import struct
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .modules import ActQuantizer, QuantLayer, WeightQuantizer
from .quantize import QuantInfo, quant_layers, quantize
from .spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

__all__ = ["save", "load", "read_quant_map", "atomic_write", "FORMAT_VERSION", "spec_to_dict", "spec_from_dict"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_META_KEY = "lowbit"
_MAX_HEADER = 100 * 1024 * 1024     # safetensors' own limit on the JSON header


# -- specs as JSON ---------------------------------------------------------------------------------
def spec_to_dict(spec: QuantSpec) -> dict:
    """A JSON-able dict of every field of ``spec``."""
    g = spec.granularity
    gran: dict = {"type": type(g).__name__}
    if isinstance(g, PerChannel):
        gran["axis"] = g.axis
    elif isinstance(g, PerGroup):
        gran.update(size=g.size, axis=g.axis)
    return {"bits": spec.bits, "signed": spec.signed, "symmetric": spec.symmetric, "granularity": gran,
            "rounding": spec.rounding, "narrow_range": spec.narrow_range, "dynamic": spec.dynamic}


def spec_from_dict(d: dict) -> QuantSpec:
    """Inverse of :func:`spec_to_dict` (raises ``ValueError`` on an unknown granularity)."""
    kinds = {"PerTensor": PerTensor, "PerChannel": PerChannel, "PerGroup": PerGroup, "PerToken": PerToken}
    gran = dict(d["granularity"])
    kind = kinds.get(gran.pop("type", None))
    if kind is None:
        raise ValueError(f"checkpoint names an unknown granularity {d['granularity']!r}")
    fields = {k: d[k] for k in ("bits", "signed", "symmetric", "rounding", "narrow_range", "dynamic")}
    return QuantSpec(granularity=kind(**gran), **fields)


# -- atomic write ----------------------------------------------------------------------------------
def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    return safetensors.torch.save(tensors, metadata=metadata)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the complete new one.

    A temporary file in the same directory receives the bytes, is flushed to disk (``fsync``) and
    renamed over ``path`` (``os.replace``, atomic on POSIX and Windows); on any error it is removed.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ValueError(f"path: directory {str(directory)!r} does not exist; create it first")
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (POSIX); not possible on every platform
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# -- save ------------------------------------------------------------------------------------------
def _quantizer_entry(qz, extra: dict) -> dict:
    return {"spec": spec_to_dict(qz.spec), "observer": qz.observer if isinstance(qz, WeightQuantizer) else qz.observer_name,
            "options": qz.observer_options, "ste": qz.ste, "enabled": qz.enabled, **extra}


def _layer_entry(layer: QuantLayer) -> dict:
    aq = layer.input_quant
    return {
        "class": type(layer).__name__,
        "float_class": layer.float_type.__name__,
        "weight_shape": list(layer._weight_shape),
        "frozen": bool(layer.frozen),
        "bias": layer.bias is not None,
        "weight": _quantizer_entry(layer.weight_quant, {"fixed": bool(layer.weight_quant.fixed)}),
        "activation": None if aq is None else _quantizer_entry(aq, {"qparams": aq.scale is not None}),
    }


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _collect(q: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    layers = {name: layer for name, layer in quant_layers(q)}
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
                implied[key] = {"value": z0, "shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
                continue
            if value.dtype != spec.storage_dtype:
                casts[key] = _dtype_name(value.dtype)
                value = value.to(spec.storage_dtype)
        sk = _storage_key(value)
        if value.numel() and sk in seen:
            aliases[key] = seen[sk]
            continue
        seen[sk] = key
        tensors[key] = value.detach().to("cpu").contiguous()
    return tensors, {"implied": implied, "casts": casts, "aliases": aliases}


def save(q: nn.Module, path: str | os.PathLike) -> Path:
    """Write the quantized model ``q`` to ``path`` (safetensors + quantization map); returns the path.

    See :mod:`lowbit.checkpoint` for the format and for what saving an un-frozen model means.
    The write is atomic: on failure the previous file at ``path`` (if any) is left as it was.
    """
    if not isinstance(q, nn.Module):
        raise TypeError(f"q must be a torch.nn.Module, got {type(q).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    layers = quant_layers(q)
    if not layers:
        raise ValueError("q has no quantized layer: quantize it with lb.quantize first "
                         "(to save a float model use safetensors.torch.save_file(model.state_dict(), path))")
    observing = [n for n, m in q.named_modules() if isinstance(m, ActQuantizer) and m.observing]
    if observing:
        raise ValueError(f"q is being calibrated ({observing[0]} is observing); call lb.save after the "
                         "`with lb.calibrate(q):` block")
    unfrozen = [n for n, layer in layers if not layer.frozen]
    if unfrozen:
        log.warning("lowbit: %d of %d quantized layers are not frozen (%s...): saving their float master weights; "
                    "call lb.freeze(q) first for a compact integer checkpoint", len(unfrozen), len(layers), unfrozen[0])
    from . import __version__  # the package root is imported by the time anyone calls save

    info: QuantInfo | None = getattr(q, "lowbit_info", None)
    tensors, extra = _collect(q)
    qmap = {
        "format": "lowbit", "format_version": FORMAT_VERSION, "lowbit_version": __version__,
        "model_class": type(q).__qualname__, "training": bool(q.training),
        "fold_bn": bool(info is not None and info.folded),
        "folded": [list(p) for p in info.folded] if info is not None else [],
        "info": None if info is None else {
            "weights": spec_to_dict(info.weights),
            "activations": None if info.activations is None else spec_to_dict(info.activations),
            "observer": info.observer, "skipped": dict(info.skipped), "uncalibrated": list(info.uncalibrated)},
        "layers": {name: _layer_entry(layer) for name, layer in layers},
        **extra,
    }
    try:
        meta = json.dumps(qmap)
    except TypeError as e:
        raise TypeError(f"the quantization map is not JSON-serializable ({e}); observer_options must hold "
                        "plain numbers, strings, lists and dicts") from e
    data = _serialize(tensors, {"format": "lowbit", _META_KEY: meta})
    atomic_write(path, data)
    return Path(path)


# -- load ------------------------------------------------------------------------------------------
def _read_header(path: Path) -> tuple[dict, int]:
    """Parse and validate the safetensors header; returns (header, expected file size)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{str(path)!r} is not a lowbit checkpoint: {size} bytes is too short for a "
                             "safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        start = f.read(min(n, 2))
        if not start.startswith(b"{"):
            raise ValueError(f"{str(path)!r} is not a safetensors file (no JSON header); lb.load reads files "
                             "written by lb.save")
        if n > _MAX_HEADER:
            raise ValueError(f"{str(path)!r} is not a safetensors file (header length {n} is implausible)")
        if 8 + n > size:
            raise ValueError(f"{str(path)!r} is truncated: its header needs {8 + n} bytes, the file has {size}")
        raw = start + f.read(n - len(start))
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a safetensors file (its header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is not a safetensors file (its header is not a JSON object)")
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise ValueError(f"{str(path)!r} is truncated: the header describes {expected} bytes, the file has {size}")
    return header, expected


def read_quant_map(path: str | os.PathLike) -> dict:
    """The quantization map (JSON metadata) of a checkpoint written by :func:`save`."""
    path = Path(path)
    header, _ = _read_header(path)
    meta = header.get("__metadata__") or {}
    if _META_KEY not in meta:
        raise ValueError(f"{str(path)!r} is a safetensors file but not a lowbit checkpoint (no quantization map); "
                         "for a float state dict use safetensors.torch.load_file and model.load_state_dict")
    try:
        qmap = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r}: the quantization map is not valid JSON ({e})") from e
    version = qmap.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint format version {version!r}; this lowbit reads versions "
                         f"<= {FORMAT_VERSION}: upgrade lowbit (it was written by lowbit {qmap.get('lowbit_version')})")
    return qmap


def _check_architecture(qmap: dict, model_like: nn.Module) -> None:
    modules = dict(model_like.named_modules())
    hint = ""
    if qmap.get("model_class") != type(model_like).__qualname__:
        hint = f" (the checkpoint was saved from a {qmap.get('model_class')}, model_like is a {type(model_like).__qualname__})"
    for name, entry in qmap["layers"].items():
        m = modules.get(name)
        if m is None:
            raise ValueError(f"model_like does not fit the checkpoint: it has no module {name!r}, a quantized "
                             f"{entry['float_class']} in the checkpoint{hint}")
        if type(m).__name__ != entry["float_class"]:
            raise ValueError(f"model_like does not fit the checkpoint: module {name!r} is a {type(m).__name__}, the "
                             f"checkpoint holds a quantized {entry['float_class']}{hint}")
        shape = list(getattr(m, "weight", torch.empty(0)).shape)
        if shape != entry["weight_shape"]:
            raise ValueError(f"model_like does not fit the checkpoint: {name}.weight has shape {shape}, the checkpoint's "
                             f"has {entry['weight_shape']}{hint}")


def _restore_tensors(qmap: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for key, dtype in qmap.get("casts", {}).items():
        out[key] = out[key].to(getattr(torch, dtype))
    for key, d in qmap.get("implied", {}).items():
        out[key] = torch.full(d["shape"], d["value"], dtype=getattr(torch, d["dtype"]))
    for key, canonical in qmap.get("aliases", {}).items():
        out[key] = out[canonical]
    return out


def _rebuild_layer(layer: QuantLayer, entry: dict, tensors: dict[str, torch.Tensor], name: str) -> None:
    w = entry["weight"]
    layer.weight_quant = WeightQuantizer(spec_from_dict(w["spec"]), w["observer"], w["options"], ste=w["ste"])
    layer.weight_quant.enabled = w["enabled"]
    a = entry["activation"]
    if a is None:
        layer.input_quant = None
    else:
        layer.input_quant = ActQuantizer(spec_from_dict(a["spec"]), a["observer"], a["options"], ste=a["ste"])
        layer.input_quant.enabled = a["enabled"]
        if a["qparams"]:
            layer.input_quant.set_qparams(tensors[f"{name}.input_quant.scale"], tensors[f"{name}.input_quant.zero_point"])
    if (layer.bias is not None) != entry["bias"]:
        raise ValueError(f"model_like does not fit the checkpoint: {name}.bias is "
                         f"{'present' if layer.bias is not None else 'absent'}, in the checkpoint it is not")
    if entry["frozen"]:
        # build the integer buffers from a zero weight on the saved grid (cheap; overwritten below)
        layer.weight = nn.Parameter(torch.zeros_like(layer.weight), requires_grad=False)
        layer.weight_quant.fix_qparams(tensors[f"{name}.weight_scale"], tensors[f"{name}.weight_zero_point"])
        aq, layer.input_quant = layer.input_quant, None   # freeze() insists on calibration; its grid is loaded
        layer.freeze()
        layer.input_quant = aq
        layer.weight_quant.fixed = w["fixed"]
    elif w["fixed"]:
        layer.weight_quant.fix_qparams(tensors[f"{name}.weight_quant.scale"], tensors[f"{name}.weight_quant.zero_point"])


def _compare_keys(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], hint: str) -> None:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(got[k].shape)}, model_like {tuple(v.shape)}"
              for k, v in expected.items() if k in got and tuple(v.shape) != tuple(got[k].shape)]
    dtypes = [f"{k}: checkpoint {_dtype_name(got[k].dtype)}, model_like {_dtype_name(v.dtype)}"
              for k, v in expected.items() if k in got and v.dtype != got[k].dtype]
    problems = []
    if missing:
        problems.append(f"tensors model_like needs but the checkpoint lacks: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"tensors in the checkpoint that model_like has no place for: {unexpected[:5]}"
                        f"{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append(f"shape mismatches: {shapes[:5]}{' ...' if len(shapes) > 5 else ''}")
    if dtypes:
        problems.append(f"dtype mismatches (convert model_like, e.g. model_like.float()): {dtypes[:5]}"
                        f"{' ...' if len(dtypes) > 5 else ''}")
    if problems:
        raise ValueError("model_like does not fit the checkpoint" + hint + ": " + "; ".join(problems))


def load(path: str | os.PathLike, model_like: nn.Module) -> nn.Module:
    """Rebuild the quantized model saved at ``path`` on ``model_like`` (a float model of the same
    architecture, left untouched) and return it; its outputs are bit-identical to the saved model's.

    Raises ``ValueError`` naming what differs if the file is truncated, not a lowbit checkpoint,
    or saved from a different architecture.
    """
    if not isinstance(model_like, nn.Module):
        raise TypeError(f"model_like must be a torch.nn.Module (the float model), got {type(model_like).__name__}")
    if any(isinstance(m, QuantLayer) for m in model_like.modules()):
        raise ValueError("model_like must be the float model (lb.load quantizes it as the checkpoint says); "
                         "got an already quantized model")
    path = Path(path)
    qmap = read_quant_map(path)
    try:
        raw = safetensors.torch.load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(f"{str(path)!r} could not be read as safetensors (damaged file?): {e}") from e
    _check_architecture(qmap, model_like)
    tensors = _restore_tensors(qmap, raw)
    hint = ""
    if qmap.get("model_class") != type(model_like).__qualname__:
        hint = f" (saved from a {qmap.get('model_class')}, model_like is a {type(model_like).__qualname__})"

    names = list(qmap["layers"])
    q = quantize(model_like, include=[glob.escape(n) for n in names], fold_bn=qmap["fold_bn"])
    if [list(p) for p in q.lowbit_info.folded] != qmap["folded"]:
        raise ValueError(f"model_like does not fit the checkpoint{hint}: BatchNorm folding gave "
                         f"{q.lowbit_info.folded}, the checkpoint folded {qmap['folded']}")
    if sorted(q.lowbit_info.quantized) != sorted(names):
        raise ValueError(f"model_like does not fit the checkpoint{hint}: quantized {q.lowbit_info.quantized}, "
                         f"the checkpoint has {names}")
    layers = dict(quant_layers(q))
    for name, entry in qmap["layers"].items():
        _rebuild_layer(layers[name], entry, tensors, name)
    _compare_keys(q.state_dict(), tensors, hint)
    q.load_state_dict(tensors, strict=True)   # copies into model_like's tensors: ties and device are kept
    info = qmap.get("info")
    if info is not None:
        q.lowbit_info = QuantInfo(
            weights=spec_from_dict(info["weights"]),
            activations=None if info["activations"] is None else spec_from_dict(info["activations"]),
            observer=info["observer"], quantized=names, skipped=dict(info["skipped"]),
            folded=[tuple(p) for p in qmap["folded"]], uncalibrated=list(info["uncalibrated"]))
    q.train(qmap.get("training", False))
    return q
