"""``lb.load``: rebuild a saved quantized model on a float model of the same architecture."""
from __future__ import annotations

import copy
import ctypes
import glob
import os
import sys
from pathlib import Path

import safetensors.torch
import torch

from torch import nn

from ..modules import ActQuantizer, QuantEmbedding, QuantLayer, WeightQuantizer, float_gemm_weight, is_linear_like, linear_features
from ..ops import packing
from ..qtensor import QTensor
from ..modules.sharing import share_frozen_codes
from ..modules.tree import set_module
from ..quantize import QuantInfo, quant_embeddings, quant_layers, quantize
from ..transforms.smooth_quant import SmoothedLinear
from .fileformat import BUFFER_PREFIX, dtype_name, read_quant_map, read_tensors, spec_from_dict
from .sharded import read_sharded

__all__ = ["load"]


def _check_architecture(qmap: dict, model_like: nn.Module) -> None:
    modules = dict(model_like.named_modules())
    hint = ""
    if qmap.get("model_class") != type(model_like).__qualname__:
        hint = f" (the checkpoint was saved from a {qmap.get('model_class')}, model_like is a {type(model_like).__qualname__})"
    for name, entry in list(qmap["layers"].items()) + list(qmap.get("embeddings", {}).items()):
        m = modules.get(name)
        if m is None:
            raise ValueError(f"model_like does not fit the checkpoint: it has no module {name!r}, a quantized "
                             f"{entry['float_class']} in the checkpoint{hint}")
        if type(m).__name__ != entry["float_class"]:
            raise ValueError(f"model_like does not fit the checkpoint: module {name!r} is a {type(m).__name__}, the "
                             f"checkpoint holds a quantized {entry['float_class']}{hint}")
        shape = list(float_gemm_weight(m).shape) if hasattr(m, "weight") else []   # Conv1D: its [out, in] view
        if shape != entry["weight_shape"]:
            raise ValueError(f"model_like does not fit the checkpoint: {name}.weight has shape {shape}, the checkpoint's "
                             f"has {entry['weight_shape']}{hint}")


def _with_smoothing(qmap: dict, model_like: nn.Module) -> nn.Module:
    """``model_like``, or a copy with the checkpoint's explicit smoothing factors wrapped around its
    linear layers (:class:`~lowbit.transforms.SmoothedLinear`; the factors come from the file)."""
    modules = dict(model_like.named_modules())
    missing = [n for n in qmap.get("smoothed", []) if not isinstance(modules.get(n), SmoothedLinear)]
    if not missing:
        return model_like
    for name in missing:
        m = modules.get(name)
        if not is_linear_like(m):
            raise ValueError(f"model_like does not fit the checkpoint: module {name!r} should be an nn.Linear "
                             f"(the checkpoint smooths its input), got {type(m).__name__ if m is not None else 'nothing'}")
    model_like = copy.deepcopy(model_like)
    for name in missing:
        linear = model_like.get_submodule(name)
        set_module(model_like, name, SmoothedLinear(linear, torch.ones(linear_features(linear)[0], device=linear.weight.device)))
    return model_like


def _restore_tensors(qmap: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for key, dtype in qmap.get("casts", {}).items():
        out[key] = out[key].to(getattr(torch, dtype))
    for key, d in qmap.get("implied", {}).items():
        out[key] = torch.full(d["shape"], d["value"], dtype=getattr(torch, d["dtype"]))
    for key, canonical in qmap.get("aliases", {}).items():
        out[key] = out[canonical]
    return out


def _frozen_skeleton(layer: QuantLayer | QuantEmbedding) -> None:
    """Turn ``layer`` into a frozen layer with placeholder integer buffers (filled by load_state_dict).

    Mirrors ``QuantLayer.freeze`` (same buffers, packed for <= 4 bits) without quantizing
    ``model_like``'s float weight, which would cost a full quantization pass on every load.
    """
    spec = layer.weight_quant.spec
    out, k = layer._gemm_shape() if isinstance(layer, QuantLayer) else layer._weight_shape
    device = layer.weight.device
    if spec.bits <= 4:
        codes = torch.zeros(packing.packed_numel(out * k, spec.bits), dtype=torch.uint8, device=device)
    else:
        codes = torch.zeros(out, k, dtype=spec.storage_dtype, device=device)
    shape = spec.param_shape((out, k))
    layer.set_frozen_weight(QTensor(codes, torch.ones(shape, device=device),
                                    torch.zeros(shape, dtype=torch.int32, device=device), spec, (out, k), spec.bits <= 4))


def _rebuild_layer(layer: QuantLayer, entry: dict, specs: list, tensors: dict[str, torch.Tensor], name: str) -> None:
    w = entry["weight"]
    layer.weight_quant = WeightQuantizer(specs[w["spec"]], w["observer"], w["options"], ste=w["ste"])
    layer.weight_quant.enabled = w["enabled"]
    a = entry["activation"]
    if a is None:
        layer.input_quant = None
    else:
        layer.input_quant = ActQuantizer(specs[a["spec"]], a["observer"], a["options"], ste=a["ste"])
        layer.input_quant.enabled = a["enabled"]
        if a["qparams"]:
            layer.input_quant.set_qparams(tensors[f"{name}.input_quant.scale"], tensors[f"{name}.input_quant.zero_point"])
    if (layer.bias is not None) != entry["bias"]:
        raise ValueError(f"model_like does not fit the checkpoint: {name}.bias is "
                         f"{'present' if layer.bias is not None else 'absent'}, in the checkpoint it is not")
    if entry["frozen"]:
        _frozen_skeleton(layer)
        layer.weight_quant.fixed = w["fixed"]
    elif w["fixed"]:
        layer.weight_quant.fix_qparams(tensors[f"{name}.weight_quant.scale"], tensors[f"{name}.weight_quant.zero_point"])


def _rebuild_embedding(table: QuantEmbedding, entry: dict, specs: list, tensors: dict[str, torch.Tensor],
                       name: str) -> None:
    w = entry["weight"]
    table.weight_quant = WeightQuantizer(specs[w["spec"]], w["observer"], w["options"], ste=w["ste"])
    table.weight_quant.enabled = w["enabled"]
    if entry["frozen"]:
        _frozen_skeleton(table)
        table.weight_quant.fixed = w["fixed"]
    elif w["fixed"]:
        table.weight_quant.fix_qparams(tensors[f"{name}.weight_quant.scale"], tensors[f"{name}.weight_quant.zero_point"])


def _compare_keys(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], hint: str) -> None:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(got[k].shape)}, model_like {tuple(v.shape)}"
              for k, v in expected.items() if k in got and tuple(v.shape) != tuple(got[k].shape)]
    dtypes = [f"{k}: checkpoint {dtype_name(got[k].dtype)}, model_like {dtype_name(v.dtype)}"
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


def _ties(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (tied weights), in groups of two or more."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, ties: list[list[str]]) -> None:
    for first, *others in ties:
        p = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, p)


def _share_tied_codes(q: nn.Module, qmap: dict) -> None:
    """Layers whose codes the checkpoint stores once (a tied pair, ``aliases``) hold one set of codes,
    scales and zero points again, as after ``lb.freeze`` (``load_state_dict`` gave each its own copy)."""
    groups = [[q.get_submodule(k.rpartition(".")[0]) for k in (canonical, key)]
              for key, canonical in qmap.get("aliases", {}).items()
              if key.endswith(".weight_codes") and canonical.endswith(".weight_codes")]
    share_frozen_codes(groups)


def _fill_buffers(q: nn.Module, raw: dict[str, torch.Tensor], names: list[str]) -> None:
    """Non-persistent buffers saved by ``lb.save``: filled where ``model_like`` has them on ``meta``."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        try:
            module = q.get_submodule(owner) if owner else q
        except AttributeError:
            continue
        current = module._buffers.get(attr)
        if isinstance(current, torch.Tensor) and current.device.type == "meta":
            module._buffers[attr] = raw[BUFFER_PREFIX + name].to(current.dtype)


def _lay_out_codes(weighted: list, dicts: tuple[dict, ...]) -> None:
    """Lay out each quantized layer's codes for its kernel, one layer at a time, dropping the
    file's copy of its codes as it goes (so the codes are never in memory twice)."""
    for m in weighted:
        old = m._buffers.get("weight_codes")
        if not m.__dict__.pop("defer_runtime", False):
            continue
        m._prepare_runtime()
        if old is not None and m._buffers.get("weight_codes") is not old:
            for d in dicts:
                for key in [k for k, t in d.items() if t is old]:
                    del d[key]
            del old
            _return_free_memory()   # the freed codes and temporaries, before the next layer's


def _return_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``): loading frees many
    mid-sized temporaries, which glibc otherwise keeps resident. No-op elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _still_meta(q: nn.Module) -> list[str]:
    return [n for n, t in list(q.named_parameters()) + list(q.named_buffers()) if t.device.type == "meta"]


@torch.inference_mode(False)   # what it builds stays ordinary tensors when called inside inference_mode
def load(path: str | os.PathLike, model_like: nn.Module) -> nn.Module:
    """Rebuild the quantized model saved at ``path`` (a file of ``lb.save``, or the directory of a
    finished ``lb.quantize_checkpoint``) on ``model_like`` (a float model of the same
    architecture, left untouched) and return it; its outputs are bit-identical to the saved model's.

    ``model_like`` may be built on the ``meta`` device (``with torch.device("meta"): model = ...``
    or transformers' empty-weights init): then only what the checkpoint holds is materialised (the
    integer codes and the float tensors it stores: norms, biases, float layers, non-persistent
    buffers such as rotary frequencies), on CPU, and a tensor the model needs but the checkpoint
    lacks is an error naming it. A real ``model_like`` is copied first (two float models in memory
    for a moment); a ``meta`` one costs nothing.

    Raises ``ValueError`` naming what differs if the file is truncated, not a lowbit checkpoint,
    or saved from a different architecture.
    """
    if not isinstance(model_like, nn.Module):
        raise TypeError(f"model_like must be a torch.nn.Module (the float model), got {type(model_like).__name__}")
    if any(isinstance(m, QuantLayer) for m in model_like.modules()):
        raise ValueError("model_like must be the float model (lb.load quantizes it as the checkpoint says); "
                         "got an already quantized model")
    path = Path(path)
    meta = any(t.device.type == "meta" for t in list(model_like.parameters()) + list(model_like.buffers()))
    if path.is_dir():   # a sharded checkpoint (lb.quantize_checkpoint)
        qmap, raw = read_sharded(path, meta)
    else:
        qmap = read_quant_map(path)
        try:   # into a meta model: plain reads (no memory map that would keep the file resident)
            raw = read_tensors(path) if meta else safetensors.torch.load_file(str(path))
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(f"{str(path)!r} could not be read as safetensors (damaged file?): {e}") from e
    try:
        specs = [spec_from_dict(d) for d in qmap["specs"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{str(path)!r}: the quantization map has a malformed spec table ({e!r})") from e
    model_like = _with_smoothing(qmap, model_like)
    _check_architecture(qmap, model_like)
    tensors = _restore_tensors(qmap, raw)
    hint = ""
    if qmap.get("model_class") != type(model_like).__qualname__:
        hint = f" (saved from a {qmap.get('model_class')}, model_like is a {type(model_like).__qualname__})"

    names = list(qmap["layers"])
    tables = qmap.get("embeddings", {})
    table_spec = specs[next(iter(tables.values()))["weight"]["spec"]] if tables else None
    q = quantize(model_like, include=[glob.escape(n) for n in names + list(tables)], fold_bn=qmap["fold_bn"],
                 embeddings=table_spec)
    if [list(p) for p in q.lowbit_info.folded] != qmap["folded"]:
        raise ValueError(f"model_like does not fit the checkpoint{hint}: BatchNorm folding gave "
                         f"{q.lowbit_info.folded}, the checkpoint folded {qmap['folded']}")
    if sorted(q.lowbit_info.quantized) != sorted(names):
        raise ValueError(f"model_like does not fit the checkpoint{hint}: quantized {q.lowbit_info.quantized}, "
                         f"the checkpoint has {names}")
    if sorted(q.lowbit_info.quantized_embeddings) != sorted(tables):
        raise ValueError(f"model_like does not fit the checkpoint{hint}: quantized embeddings "
                         f"{q.lowbit_info.quantized_embeddings}, the checkpoint has {list(tables)}")
    layers = dict(quant_layers(q))
    for name, entry in qmap["layers"].items():
        _rebuild_layer(layers[name], entry, specs, tensors, name)
    found = dict(quant_embeddings(q))
    for name, entry in tables.items():
        _rebuild_embedding(found[name], entry, specs, tensors, name)
    buffers = [k for k in tensors if k.startswith(BUFFER_PREFIX)]
    buffer_tensors = {k: tensors.pop(k) for k in buffers}
    _compare_keys(q.state_dict(), tensors, hint)
    weighted = [m for m in q.modules() if isinstance(m, (QuantLayer, QuantEmbedding))]
    ties = _ties(q)
    if meta:
        for m in weighted:
            m.defer_runtime = True
        q.load_state_dict(tensors, strict=True, assign=True)   # the checkpoint's tensors become the model's
        _retie(q, ties)
        _fill_buffers(q, buffer_tensors, qmap.get("buffers", []))
        missing = _still_meta(q)
        if missing:
            raise ValueError(f"model_like was built on the meta device and the checkpoint lacks tensors it needs: "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; build those modules on a real "
                             "device, or save the checkpoint from a model that holds them")
    else:
        q.load_state_dict(tensors, strict=True)   # copies into model_like's tensors: ties and device are kept
    info = qmap.get("info")
    if info is not None:
        q.lowbit_info = QuantInfo(
            weights=specs[info["weights"]],
            activations=None if info["activations"] is None else specs[info["activations"]],
            observer=info["observer"], quantized=names, skipped=dict(info["skipped"]),
            folded=[tuple(p) for p in qmap["folded"]], uncalibrated=list(info["uncalibrated"]),
            embeddings=specs[info["embeddings"]] if info.get("embeddings") is not None else None,
            quantized_embeddings=list(tables))
    q.train(qmap.get("training", False))
    if meta:
        _lay_out_codes(weighted, (raw, tensors))
    _share_tied_codes(q, qmap)
    del raw, tensors, buffer_tensors
    _return_free_memory()
    return q
