"""Format version 2: the quantization map without what a reader can work out (a smaller fixed cost).

``lb.save`` builds the full map (the layout of :mod:`lowbit.checkpoint`, format version 1) and
writes :func:`compact` of it; :func:`lowbit.checkpoint.read_quant_map` returns :func:`expand` of
what it reads, so every reader sees the full layout whichever version the file has. The rules:

* ``specs``: fields at their ``QuantSpec`` defaults are left out (``signed: true``,
  ``symmetric: true``, ``rounding: "nearest"``, ``narrow_range: false``, ``dynamic: false``, a
  ``PerTensor`` granularity); ``bits`` is always written.
* ``layers``: ``"layer_defaults"`` holds the most common ``frozen``, ``bias``, ``weight`` and
  ``activation`` entries; each layer writes ``float_class``, ``weight_shape`` and only the fields
  that differ. ``class`` is left out when it is ``"Quant" + float_class``.
* ``implied`` (zero points of symmetric grids, not stored): ``{dtype: [tensor, ...]}``; the value
  is the quantizer's ``spec.symmetric_zero_point`` and the shape that of the matching scale
  tensor in the file. ``casts``: ``{dtype: [tensor, ...]}``.
* ``embeddings`` (quantized embedding tables: ``{name: {"class", "float_class", "weight_shape",
  "frozen", "weight"}}``, format version 3) is written as is, and only when the model has some;
  version 2 files (which have none) read the same way.
* empty ``skipped``/``uncalibrated``/``aliases``/``casts``/``implied`` and ``training: false`` are
  left out.

Measured on the built-in MNIST-1D CNN at 4 bits (``w4g128``): the map goes from 2,792 to 1,347
characters and the file from 22,960 to 21,272 bytes (``benchmarks/bench_ptq.py``).
"""
from __future__ import annotations

import json
from collections import Counter

from .fileformat import spec_from_dict

__all__ = ["compact", "expand", "SPEC_DEFAULTS"]

SPEC_DEFAULTS = {"signed": True, "symmetric": True, "rounding": "nearest", "narrow_range": False, "dynamic": False,
                 "format": "int"}
_LAYER_FIELDS = ("frozen", "bias", "weight", "activation")


def _compact_spec(d: dict) -> dict:
    out = {k: v for k, v in d.items() if k == "bits" or SPEC_DEFAULTS.get(k, object()) != v}
    if d.get("granularity", {}).get("type") == "PerTensor":
        out.pop("granularity", None)
    return out


def _expand_spec(d: dict) -> dict:
    out = {"bits": d["bits"], **{k: d.get(k, v) for k, v in SPEC_DEFAULTS.items()},
           "granularity": d.get("granularity", {"type": "PerTensor"})}
    if out["format"] == "int":   # the full map names only non-integer formats (spec_to_dict)
        del out["format"]
    return out


def _key(v) -> str:
    return json.dumps(v, sort_keys=True)


def _group(mapping: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in mapping.items():
        out.setdefault(v, []).append(k)
    return out


def compact(full: dict) -> dict:
    """The version-2 form of a full (version-1 layout) quantization map."""
    out = {k: v for k, v in full.items() if k not in ("layers", "specs", "implied", "casts", "info", "aliases")}
    # 4 only when a spec names a number format (readers before version 4 would take it for int)
    out["format_version"] = 4 if any("format" in s for s in full["specs"]) else 3
    if not full.get("embeddings"):
        out.pop("embeddings", None)
    if not out.get("training"):
        out.pop("training", None)
    if not out.get("buffers"):
        out.pop("buffers", None)
    out["specs"] = [_compact_spec(s) for s in full["specs"]]
    info = full.get("info")
    if info is not None:
        info = {k: v for k, v in info.items() if not (k in ("skipped", "uncalibrated") and not v)}
    out["info"] = info
    layers = full["layers"]
    defaults = {}
    for f in _LAYER_FIELDS:
        counts = Counter(_key(e[f]) for e in layers.values())
        if counts:
            defaults[f] = json.loads(counts.most_common(1)[0][0])
    out["layer_defaults"] = defaults
    out["layers"] = {}
    for name, e in layers.items():
        c = {"float_class": e["float_class"], "weight_shape": e["weight_shape"]}
        if e["class"] != "Quant" + e["float_class"]:
            c["class"] = e["class"]
        c.update({f: e[f] for f in _LAYER_FIELDS if _key(e[f]) != _key(defaults[f])})
        out["layers"][name] = c
    if full.get("implied"):
        out["implied"] = _group({k: v["dtype"] for k, v in full["implied"].items()})
    if full.get("casts"):
        out["casts"] = _group(full["casts"])
    if full.get("aliases"):
        out["aliases"] = full["aliases"]
    return out


def _quantizer_spec(full: dict, key: str) -> dict:
    """The (expanded) spec of the quantizer a zero-point tensor belongs to."""
    for suffix, part in ((".weight_zero_point", "weight"), (".weight_quant.zero_point", "weight"),
                         (".input_quant.zero_point", "activation")):
        if key.endswith(suffix):
            owner = key[: -len(suffix)]
            entry = full["layers"].get(owner) or full.get("embeddings", {}).get(owner)
            if entry is not None and entry.get(part) is not None:
                return full["specs"][entry[part]["spec"]]
    raise ValueError(f"the quantization map implies zero point {key!r}, which belongs to no quantized layer; "
                     "the file is damaged")


def expand(small: dict, header: dict) -> dict:
    """The full (version-1 layout) map from a version-2 one; ``header`` is the safetensors header
    (tensor shapes, for the implied zero points)."""
    full = {k: v for k, v in small.items() if k not in ("layer_defaults", "implied", "casts")}
    full["training"] = small.get("training", False)
    full["specs"] = [_expand_spec(s) for s in small["specs"]]
    info = small.get("info")
    if info is not None:
        full["info"] = {"skipped": {}, "uncalibrated": [], **info}
    defaults = small.get("layer_defaults", {})
    full["layers"] = {}
    for name, c in small["layers"].items():
        e = {"class": c.get("class", "Quant" + c["float_class"]), "float_class": c["float_class"],
             "weight_shape": c["weight_shape"]}
        for f in _LAYER_FIELDS:
            if f not in c and f not in defaults:
                raise ValueError(f"the quantization map has no {f!r} for layer {name!r}; the file is damaged")
            e[f] = c.get(f, defaults.get(f))
        full["layers"][name] = e
    full["casts"] = {k: dtype for dtype, keys in small.get("casts", {}).items() for k in keys}
    full["aliases"] = dict(small.get("aliases", {}))
    full["buffers"] = list(small.get("buffers", []))
    full["implied"] = {}
    for dtype, keys in small.get("implied", {}).items():
        for key in keys:
            scale = key[: -len("zero_point")] + "scale"
            scale = full["aliases"].get(scale, scale)
            if scale not in header:
                raise ValueError(f"the quantization map implies {key!r} but the file has no {scale!r}; it is damaged")
            z0 = spec_from_dict(_quantizer_spec(full, key)).symmetric_zero_point
            full["implied"][key] = {"value": z0, "shape": list(header[scale]["shape"]), "dtype": dtype}
    return full
