"""The checkpoint format: specs as JSON, the safetensors header, the quantization map."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ..spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

__all__ = ["FORMAT_VERSION", "META_KEY", "spec_to_dict", "spec_from_dict", "dtype_name", "read_header", "read_quant_map"]

FORMAT_VERSION = 4   # 4: + number formats (spec "format": fp8/nf4/mx codes); 3: + quantized embedding tables; 2: compact map (lowbit.checkpoint.compact); 1: full map
META_KEY = "lowbit"
BUFFER_PREFIX = "__buffer__."   # tensors of non-persistent buffers (listed in the map's "buffers")
_MAX_HEADER = 100 * 1024 * 1024     # safetensors' own limit on the JSON header


def spec_to_dict(spec: QuantSpec) -> dict:
    """A JSON-able dict of every field of ``spec``."""
    g = spec.granularity
    gran: dict = {"type": type(g).__name__}
    if isinstance(g, PerChannel):
        gran["axis"] = g.axis
    elif isinstance(g, PerGroup):
        gran.update(size=g.size, axis=g.axis)
    out = {"bits": spec.bits, "signed": spec.signed, "symmetric": spec.symmetric, "granularity": gran,
           "rounding": spec.rounding, "narrow_range": spec.narrow_range, "dynamic": spec.dynamic}
    if spec.format != "int":  # the number format (lowbit.formats); int grids keep the version-3 entry
        out["format"] = spec.format
    return out


def spec_from_dict(d: dict) -> QuantSpec:
    """Inverse of :func:`spec_to_dict` (raises ``ValueError`` on an unknown granularity)."""
    kinds = {"PerTensor": PerTensor, "PerChannel": PerChannel, "PerGroup": PerGroup, "PerToken": PerToken}
    gran = dict(d["granularity"])
    kind = kinds.get(gran.pop("type", None))
    if kind is None:
        raise ValueError(f"checkpoint names an unknown granularity {d['granularity']!r}")
    fields = {k: d[k] for k in ("bits", "signed", "symmetric", "rounding", "narrow_range", "dynamic")}
    return QuantSpec(granularity=kind(**gran), format=d.get("format", "int"), **fields)



def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_header(path: Path) -> tuple[dict, int]:
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
    header, _ = read_header(path)
    meta = header.get("__metadata__") or {}
    if META_KEY not in meta:
        raise ValueError(f"{str(path)!r} is a safetensors file but not a lowbit checkpoint (no quantization map); "
                         "for a float state dict use safetensors.torch.load_file and model.load_state_dict")
    try:
        qmap = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r}: the quantization map is not valid JSON ({e})") from e
    version = qmap.get("format_version") if isinstance(qmap, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint format version {version!r}; this lowbit reads versions "
                         f"<= {FORMAT_VERSION}: upgrade lowbit (it was written by lowbit "
                         f"{qmap.get('lowbit_version') if isinstance(qmap, dict) else '?'})")
    if version >= 2:
        from .compact import expand

        try:
            qmap = expand(qmap, header)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{str(path)!r}: the quantization map is malformed ({e!r}); the file is damaged") from e
    missing = [k for k in ("layers", "specs", "fold_bn", "folded") if k not in qmap]
    if missing:
        raise ValueError(f"{str(path)!r}: the quantization map lacks {missing}; the file is damaged")
    qmap.setdefault("embeddings", {})   # files before version 3 hold no quantized embedding tables
    return qmap



_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
if hasattr(torch, "uint16"):
    _ST_DTYPES["U16"] = torch.uint16


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path``, each read into memory of its own (plain
    reads, no memory map: a tensor the caller drops is gone, and no page of the file stays mapped).
    Raises ``ValueError`` naming the tensor if the file is damaged."""
    header, _ = read_header(path)
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        base = 8 + n
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = _ST_DTYPES[entry["dtype"]]
                shape = [int(d) for d in entry["shape"]]
                start, end = (int(v) for v in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{str(path)!r}: tensor {name!r} has a malformed header entry ({e!r})") from e
            numel = 1
            for d in shape:
                numel *= d
            if end - start != numel * torch.empty(0, dtype=dtype).element_size():
                raise ValueError(f"{str(path)!r}: tensor {name!r} has {end - start} bytes for shape {shape}; the file "
                                 "is damaged")
            buf = bytearray(end - start)
            f.seek(base + start)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{str(path)!r} is truncated: tensor {name!r} is cut off")
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(shape)
    return out
