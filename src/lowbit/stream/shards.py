"""Reading a Hugging Face checkpoint's ``*.safetensors`` shards one unit's tensors at a time.

The tensor -> file map comes from ``model.safetensors.index.json`` when there is one, else from the
headers of every ``*.safetensors`` file in the directory. Every header is read and checked up
front (a truncated or damaged shard, or an index naming a missing one, fails before any work).
Tensors are read with plain ``readinto`` calls into memory of their own, not through a memory map:
the pages of a mapped file that a unit touched would stay resident (and count in RSS) long after
the unit is freed.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from ..checkpoint.fileformat import _ST_DTYPES, read_header

__all__ = ["ShardReader"]


class ShardReader:
    """The tensors of the checkpoint directory ``src``: ``names()``, ``read(names)``, ``fingerprint()``."""

    def __init__(self, src: Path) -> None:
        self.src = src
        files = sorted(src.glob("*.safetensors"))
        index_path = src / "model.safetensors.index.json"
        if not files and not index_path.is_file():
            pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
            hint = (f" (it holds {pickles[:3]}: pickle checkpoints are not read; convert them once with "
                    "transformers: AutoModelForCausalLM.from_pretrained(src).save_pretrained(out, "
                    "safe_serialization=True))") if pickles else ""
            raise ValueError(f"src: {str(src)!r} holds no *.safetensors file{hint}")
        self.entries: dict[str, tuple[Path, dict, int]] = {}   # tensor -> (file, header entry, data start)
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
                weight_map = index["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"src: {str(index_path)!r} is not a valid safetensors index ({e!r})") from e
            wanted = sorted(set(weight_map.values()))
            missing = [f for f in wanted if not (src / f).is_file()]
            if missing:
                raise ValueError(f"src: {str(index_path)!r} names shard {missing[0]!r}, which is not in {str(src)!r} "
                                 f"({len(missing)} missing); download the missing shards or fix the index")
            files = [src / f for f in wanted]
        self.files = files
        for path in files:
            header, _ = read_header(path)   # raises naming the file if it is truncated or not safetensors
            with path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
            for name, entry in header.items():
                if name != "__metadata__":
                    self.entries[name] = (path, entry, 8 + n)
        if index_path.is_file():
            absent = [k for k, f in weight_map.items() if k not in self.entries]
            if absent:
                raise ValueError(f"src: {str(index_path)!r} places {absent[0]!r} in {weight_map[absent[0]]!r}, which "
                                 "does not hold it; the index and the shards do not match")

    def names(self) -> list[str]:
        return list(self.entries)

    def fingerprint(self) -> str:
        """A hash of every shard's name, size and header (cheap: no tensor data is read)."""
        h = hashlib.sha256()
        for path in self.files:
            h.update(path.name.encode())
            h.update(str(path.stat().st_size).encode())
            with path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                h.update(f.read(n))
        return h.hexdigest()

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each in memory of its own (cast to ``dtype`` when given)."""
        missing = [k for k in names if k not in self.entries]
        if missing:
            raise ValueError(f"src: the checkpoint in {str(self.src)!r} lacks {missing[:3]}; it does not match its "
                             "config.json (a different model, or shards missing)")
        out = {}
        by_file: dict[Path, list[str]] = {}
        for k in names:
            by_file.setdefault(self.entries[k][0], []).append(k)
        for path, keys in by_file.items():
            with path.open("rb") as f:
                for k in sorted(keys, key=lambda k: int(self.entries[k][1]["data_offsets"][0])):
                    _, entry, base = self.entries[k]
                    try:
                        st_dtype = _ST_DTYPES[entry["dtype"]]
                    except KeyError:
                        raise ValueError(f"src: {str(path)!r}: tensor {k!r} has dtype {entry.get('dtype')!r}, "
                                         "which lowbit cannot read") from None
                    start, end = (int(v) for v in entry["data_offsets"])
                    shape = [int(d) for d in entry["shape"]]
                    buf = bytearray(end - start)
                    f.seek(base + start)
                    if f.readinto(buf) != len(buf):
                        raise ValueError(f"src: {str(path)!r} is truncated: tensor {k!r} is cut off; download the "
                                         "shard again")
                    t = torch.frombuffer(buf, dtype=st_dtype) if buf else torch.empty(0, dtype=st_dtype)
                    t = t.reshape(shape)
                    out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t
        return out
