"""A sharded lowbit checkpoint: a directory of lowbit files listed by ``lowbit.index.json``.

``lb.quantize_checkpoint`` writes one lowbit file per part of the model (embeddings, each decoder
layer, the final norm and ``lm_head``), each with the quantization map of its own modules, and the
index last. :func:`read_sharded` merges the maps (spec tables renumbered into one) and reads every
shard's tensors, so ``lb.load(directory, model_like)`` rebuilds the whole model as from one file.
A directory without the index is not a complete checkpoint and is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from .fileformat import read_quant_map, read_tensors

__all__ = ["INDEX", "read_sharded"]

INDEX = "lowbit.index.json"


def _merge_into(merged: dict, qmap: dict) -> None:
    remap = {}
    for i, spec in enumerate(qmap["specs"]):
        if spec not in merged["specs"]:
            merged["specs"].append(spec)
        remap[i] = merged["specs"].index(spec)

    def fix(entry: dict | None) -> None:
        if entry is not None and entry.get("spec") is not None:
            entry["spec"] = remap[entry["spec"]]

    for name, entry in qmap["layers"].items():
        fix(entry["weight"])
        fix(entry.get("activation"))
        merged["layers"][name] = entry
    for name, entry in qmap.get("embeddings", {}).items():
        fix(entry["weight"])
        merged["embeddings"][name] = entry
    for key in ("implied", "casts", "aliases"):
        merged[key].update(qmap.get(key, {}))
    merged["buffers"].extend(qmap.get("buffers", []))
    merged["smoothed"].extend(qmap.get("smoothed", []))
    info = qmap.get("info")
    if info is not None:
        for k in ("weights", "activations", "embeddings"):
            if info.get(k) is not None:
                info[k] = remap[info[k]]
        if merged["info"] is None:
            merged["info"] = {k: info.get(k) for k in ("weights", "activations", "observer", "embeddings")}
            merged["info"].update(skipped={}, uncalibrated=[])
        elif merged["info"].get("embeddings") is None and info.get("embeddings") is not None:
            merged["info"]["embeddings"] = info["embeddings"]
        merged["info"]["skipped"].update(info.get("skipped", {}))
        merged["info"]["uncalibrated"].extend(info.get("uncalibrated", []))


def read_sharded(directory: Path, meta: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(merged quantization map, every tensor)`` of the sharded checkpoint in ``directory``."""
    index_path = directory / INDEX
    if not index_path.is_file():
        progress = directory / "lowbit-progress.json"
        why = (" (lowbit-progress.json is there: an interrupted lb.quantize_checkpoint; run it again to finish)"
               if progress.is_file() else "")
        raise ValueError(f"path: {str(directory)!r} is a directory without {INDEX}, so not a complete lowbit "
                         f"checkpoint{why}; pass a file written by lb.save or a finished lb.quantize_checkpoint output")
    try:
        index = json.loads(index_path.read_text())
        shards = list(index["shards"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{str(index_path)!r} is damaged ({e!r})") from e
    merged = {"specs": [], "layers": {}, "embeddings": {}, "implied": {}, "casts": {}, "aliases": {},
              "buffers": [], "smoothed": [], "info": None, "fold_bn": False, "folded": [], "training": False,
              "model_class": index.get("model_class")}
    tensors: dict[str, torch.Tensor] = {}
    for name in shards:
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{str(index_path)!r} lists shard {name!r}, which is missing from {str(directory)!r}")
        _merge_into(merged, read_quant_map(path))
        try:
            tensors.update(read_tensors(path) if meta else safetensors.torch.load_file(str(path)))
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(f"{str(path)!r} could not be read as safetensors (damaged file?): {e}") from e
    if not merged["smoothed"]:
        del merged["smoothed"]
    return merged, tensors
