"""``lb.export_compressed_tensors`` / ``lb.load_compressed_tensors``: the ``compressed-tensors``
checkpoint format (llm-compressor's; loaded by ``transformers`` with the ``compressed-tensors``
package and served by vLLM).

A checkpoint is a Hugging Face model directory: ``config.json`` with a ``quantization_config``
(``quant_method: compressed-tensors``, ``format: pack-quantized``) and ``model.safetensors``. Each
quantized ``nn.Linear`` ``N`` stores (compressed-tensors ``PackedQuantizationCompressor``):

* ``N.weight_packed`` int32 ``[out, ceil(in * b / 32)]``: the signed codes ``q`` (``[-2^(b-1),
  2^(b-1))``) plus ``2^(b-1)``, element ``i`` of a row at bits ``i*b .. i*b+b-1`` (little end first);
* ``N.weight_scale`` ``[out, in / group_size]`` (``group``), ``[out, 1]`` (``channel``) or ``[1]``
  (``tensor``);
* ``N.weight_zero_point`` (asymmetric only): signed zero points packed the same way along the
  *rows* (dim 0), shape ``[ceil(out * b / 32), groups]``;
* ``N.weight_shape`` int ``[2]``.

``w = (q - zero_point) * scale``: lowbit's grid exactly (an unsigned lowbit grid is shifted by
``2^(b-1)``, codes and zero points alike, which keeps ``w``). Layers grouped by identical grid become
``config_groups`` whose ``targets`` are the module names. What the format cannot hold -- grids
other than tensor/channel/group along the input, 3/5/6/7-bit codes, quantized embeddings and
convolutions -- is written as float (listed in ``CTExportInfo.fallback``); activation quantizers
are listed in ``dropped`` (weight-only export).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.atomic import atomic_write
from ..modules.layer import QuantLayer
from ..modules.linear import QuantLinear
from ..modules.quant_weight import QuantWeight
from ..qtensor import QTensor
from ..spec import PerChannel, PerGroup, PerTensor, QuantSpec
from .gguf import _hf_model

__all__ = ["export_compressed_tensors", "load_compressed_tensors", "CTExportInfo", "pack_int32", "unpack_int32"]

log = logging.getLogger(__name__)

_BITS = (2, 4, 8)   # widths whose packing puts whole codes in each int32 (what vLLM's kernels read)


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed codes ``q`` (2-D) -> int32 words along ``dim``: ``q + 2^(b-1)`` at bit ``i*b`` of the row."""
    v = (q.to(torch.int64) + (1 << (bits - 1)))
    if dim == 0:
        v = v.T
    rows, cols = v.shape
    per = 32 // bits
    words = -(-cols // per)
    v = torch.nn.functional.pad(v, (0, words * per - cols)).reshape(rows, words, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    packed = (v << shifts).sum(-1)
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)
    return packed.T.contiguous() if dim == 0 else packed.contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``n`` signed codes per row (``dim=1``) or column (``dim=0``), int32."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        p = p.T
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    v = ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(p.shape[0], -1)[:, :n] - (1 << (bits - 1))
    v = v.to(torch.int32)
    return v.T.contiguous() if dim == 0 else v


@dataclass
class CTExportInfo:
    """What :func:`export_compressed_tensors` wrote: ``quantized`` (module -> config group),
    ``fallback`` (quantized module written as float -> why), ``dropped`` (not in the checkpoint)."""

    path: str
    quantized: dict[str, str] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.path}: compressed-tensors pack-quantized, {len(self.quantized)} quantized linear layers"]
        lines += [f"  {n}: written as float ({why})" for n, why in self.fallback.items()]
        lines += [f"  not in the checkpoint: {d}" for d in self.dropped]
        return "\n".join(lines)


def _weight_args(spec: QuantSpec, cols: int) -> dict | str:
    """compressed-tensors QuantizationArgs for ``spec`` on rows of ``cols``, or why it has none."""
    if spec.bits not in _BITS:
        return f"{spec.bits}-bit codes (pack-quantized here: {_BITS})"
    if spec.narrow_range and not spec.symmetric:
        return "asymmetric narrow-range grid"
    g = spec.granularity
    if isinstance(g, PerGroup) and g.axis in (-1, 1):
        if cols % g.size:
            return f"rows of {cols} are not whole groups of {g.size}"
        strategy, group = "group", g.size
    elif isinstance(g, PerChannel) and g.axis in (0, -2):
        strategy, group = "channel", None
    elif isinstance(g, PerTensor):
        strategy, group = "tensor", None
    else:
        return f"granularity {g} (compressed-tensors: tensor, channel, group along the input)"
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": strategy,
            "group_size": group, "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
            "block_structure": None}


def export_compressed_tensors(q: nn.Module, path: str | os.PathLike) -> CTExportInfo:
    """Write ``q`` (a lowbit-quantized Hugging Face model, or a model around one) to directory
    ``path`` in the compressed-tensors format; see the module docstring. ``path`` is created if
    missing; each file is written atomically."""
    from safetensors.torch import save

    if not isinstance(q, nn.Module):
        raise TypeError(f"q must be a torch.nn.Module, got {type(q).__name__}")
    hf = _hf_model(q)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path {str(path)!r} is a file; give a directory")
    info = CTExportInfo(path=str(path))
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, tuple[dict, list[str]]] = {}
    quant_modules: dict[str, QuantWeight] = {n: m for n, m in hf.named_modules() if isinstance(m, QuantWeight)}
    for name, m in quant_modules.items():
        if isinstance(m, QuantLayer) and m.input_quant is not None and m.input_quant.enabled:
            info.dropped.append(f"activation quantization of {name} (exported weight-only)")
        qt = m.qweight
        args = _weight_args(qt.spec, qt.shape[1]) if isinstance(m, QuantLinear) else \
            f"{type(m).__name__} (compressed-tensors quantizes nn.Linear)"
        if isinstance(args, str):
            info.fallback[name] = args
            w = qt.dequantize().reshape(m._weight_shape)
            if isinstance(m, QuantLayer):      # the float layer's own layout (a transposed conv: [in, out/g, k...])
                w = type(m).float_weight_from_gemm(m, w)
            tensors[f"{name}.weight"] = w.to(m._weight_dtype)
            continue
        shift = 0 if qt.spec.signed else 1 << (qt.spec.bits - 1)   # unsigned grid -> the signed one
        codes = qt.int_repr().to(torch.int32) - shift
        zp = qt.zero_point.to(torch.int32) - shift
        out = qt.shape[0]
        scale = qt.scale.detach().float()
        scale = scale.reshape(out, -1) if args["strategy"] != "tensor" else scale.reshape(1)
        tensors[f"{name}.weight_packed"] = pack_int32(codes, qt.spec.bits)
        tensors[f"{name}.weight_scale"] = scale.contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor(list(qt.shape), dtype=torch.int64)
        if not qt.spec.symmetric:
            z = zp.reshape(out, -1) if args["strategy"] != "tensor" else zp.reshape(1, 1)
            tensors[f"{name}.weight_zero_point"] = pack_int32(z, qt.spec.bits, dim=0) \
                if args["strategy"] != "tensor" else z.reshape(1).to(torch.int8)
        elif bool((zp != 0).any()):
            raise ValueError(f"q: {name} has a symmetric grid with a non-zero zero point; re-quantize it")
        key = json.dumps(args, sort_keys=True)
        groups.setdefault(key, (args, []))[1].append(name)
        info.quantized[name] = key
    skip = tuple(f"{n}." for n in quant_modules)
    seen: set[int] = set()
    for name, t in hf.state_dict().items():
        if name.startswith(skip) and not name.endswith(".bias"):
            continue
        if t.data_ptr() in seen and t.numel():          # tied weights: stored once, re-tied by the config
            continue
        seen.add(t.data_ptr())
        tensors.setdefault(name, t.detach())
    ignore = [n for n, m in hf.named_modules() if isinstance(m, nn.Linear) and n not in info.quantized]
    config_groups = {}
    for i, (args, names) in enumerate(groups.values()):
        config_groups[f"group_{i}"] = {"targets": names, "weights": args, "input_activations": None,
                                       "output_activations": None, "format": "pack-quantized"}
        for n in names:
            info.quantized[n] = f"group_{i}"
    cfg = hf.config.to_dict()
    cfg["architectures"] = cfg.get("architectures") or [type(hf).__name__]
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                  "quantization_status": "compressed", "config_groups": config_groups,
                                  "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
                                  "sparsity_config": {}}
    data = save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata={"format": "pt"})
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "model.safetensors", data)
    atomic_write(path / "config.json", (json.dumps(cfg, indent=2, default=str) + "\n").encode())
    log.info("%s", info.summary())
    return info


def _matches(name: str, module: nn.Module, targets: list[str]) -> bool:
    for t in targets:
        if t.startswith("re:") and re.match(t[3:], name):
            return True
        if t == name or t == type(module).__name__:
            return True
    return False


def _spec(args: dict) -> QuantSpec:
    if args.get("type", "int") != "int" or args.get("dynamic"):
        raise ValueError(f"path: weights {args} are not a static integer grid lowbit can hold")
    strategy = args.get("strategy")
    gran = {"group": lambda: PerGroup(int(args["group_size"])), "channel": lambda: PerChannel(0),
            "tensor": PerTensor}.get(strategy)
    if gran is None:
        raise ValueError(f"path: weight strategy {strategy!r} is not supported (tensor, channel, group)")
    return QuantSpec(bits=int(args["num_bits"]), symmetric=bool(args.get("symmetric", True)), granularity=gran())


def load_compressed_tensors(path: str | os.PathLike, model_cls=None) -> nn.Module:
    """A frozen lowbit model from a compressed-tensors checkpoint directory (``pack-quantized`` or
    ``int-quantized`` weights): each quantized ``nn.Linear`` becomes a frozen
    :class:`~lowbit.modules.QuantLinear` holding the checkpoint's codes, scales and zero points.

    ``model_cls`` (default: the transformers class named by ``config.architectures``) builds the
    model from the config; float tensors are loaded as they are.
    """
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"path: {str(path)!r} has no config.json; give a Hugging Face model directory")
    raw = json.loads(cfg_file.read_text())
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"path: config.json has no compressed-tensors quantization_config (quant_method "
                         f"{qc.get('quant_method')!r})")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"path: no .safetensors files in {str(path)!r}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if model_cls is None:
        arch = (raw.get("architectures") or [None])[0]
        model_cls = getattr(transformers, arch, None) if arch else None
        if model_cls is None:
            raise ValueError(f"path: config.json names no transformers class ({arch!r}); pass model_cls=")
    model = model_cls(config).eval()
    ignore = qc.get("ignore") or []
    plan: dict[str, tuple[QuantSpec, str]] = {}
    for gname, group in (qc.get("config_groups") or {}).items():
        if group.get("input_activations") or group.get("output_activations"):
            log.warning("load_compressed_tensors: %s has activation quantization; lowbit loads its weights only", gname)
        fmt = group.get("format") or qc.get("format")
        if fmt not in ("pack-quantized", "int-quantized", "naive-quantized"):
            raise ValueError(f"path: format {fmt!r} of {gname} is not supported (pack-quantized, int-quantized)")
        spec = _spec(group["weights"])
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name not in plan and _matches(name, m, group.get("targets") or []) \
                    and not _matches(name, m, ignore):
                plan[name] = (spec, fmt)
    floats = {k: v for k, v in state.items() if not any(k.startswith(n + ".weight") for n in plan)}
    missing, unexpected = model.load_state_dict(floats, strict=False)
    missing = [k for k in missing if not any(k == f"{n}.weight" for n in plan)]
    if unexpected:
        raise ValueError(f"path: tensors {unexpected[:5]} do not belong to {model_cls.__name__}")
    if missing and not getattr(config, "tie_word_embeddings", False):
        log.warning("load_compressed_tensors: no tensor for %s (left as initialised)", missing[:5])
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, (spec, _) in plan.items():   # each planned nn.Linear becomes a QuantLinear on its grid
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, QuantLinear.from_float(getattr(holder, child), spec, None))
    modules = dict(model.named_modules())
    for name, (spec, fmt) in plan.items():
        layer = modules[name]
        out, cols = layer._codes_shape()
        if fmt == "pack-quantized":
            codes = unpack_int32(state[f"{name}.weight_packed"], spec.bits, cols)
        else:
            codes = state[f"{name}.weight"].to(torch.int32)
        scale = state[f"{name}.weight_scale"].float()
        pshape = spec.param_shape(torch.Size((out, cols)))
        zp_t = state.get(f"{name}.weight_zero_point")
        if zp_t is None:
            zp = torch.zeros(pshape, dtype=torch.int32)
        elif fmt == "pack-quantized" and zp_t.dtype == torch.int32 and not isinstance(spec.granularity, PerTensor):
            zp = unpack_int32(zp_t, spec.bits, out, dim=0)
        else:
            zp = zp_t.to(torch.int32)
        layer.set_frozen_weight(QTensor.from_int(codes, spec, scale.reshape(pshape), zp.reshape(pshape)))
    return model
