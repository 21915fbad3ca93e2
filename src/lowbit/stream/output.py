"""The output directory of a streamed run: one atomic shard per unit, a progress file, an index.

Layout of ``dst``::

    lowbit-00000-of-00027.safetensors ...   one lowbit checkpoint file per unit (head, layers, tail)
    lowbit-progress.json                    the run's key and the units finished so far
    .lowbit-work/                           resume state: recorded layer arguments, the activations
                                            entering the next unit (deleted when the run completes)
    config.json, tokenizer files            copied from ``src`` at the end
    lowbit.index.json                       written last: its presence means "complete"

Every file is written atomically (:mod:`lowbit.checkpoint.atomic`: temporary file, ``fsync``,
``os.replace``), and the progress file is updated only after the unit's shard and the activations
after it are on disk; so an interrupted run resumes at the first unit the progress file does not
list, from exactly the activations an uninterrupted run would have had, and ``dst`` holds an index
(the mark of a complete checkpoint that :func:`lowbit.load` reads) only when every shard is there.
"""
from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

import torch

from ..checkpoint.atomic import atomic_file, atomic_write
from ..checkpoint.writer import payload

__all__ = ["Output", "INDEX", "PROGRESS", "WORK"]

INDEX = "lowbit.index.json"
PROGRESS = "lowbit-progress.json"
WORK = ".lowbit-work"
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
         "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a deterministic header (keys sorted; the library orders metadata as a
    hash map does, so two runs would differ in bytes): a resumed run must be byte-identical."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def _disk_full(e: OSError, path: Path) -> OSError:
    if e.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on the device writing {str(path)!r}: free some space (or pass "
                                     "another dst) and run again; the run resumes at the unit it stopped in")
    return e


class Output:
    """Writes ``dst`` for a run identified by ``key`` over ``units`` unit names."""

    def __init__(self, dst: Path, key: str, units: list[str], resume: bool) -> None:
        self.dst, self.key, self.units = dst, key, units
        self.work = dst / WORK
        dst.mkdir(parents=True, exist_ok=True)
        progress = dst / PROGRESS
        self.done: list[str] = []
        if progress.is_file() and resume:
            try:
                state = json.loads(progress.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"dst: {str(progress)!r} is damaged ({e}); pass resume=False to start over") from e
            if state.get("key") != key:
                raise ValueError(f"dst: {str(dst)!r} holds a run of a different source, recipe or calibration "
                                 f"({PROGRESS} has another key); pass another dst, or resume=False to start over")
            self.done = list(state.get("done", []))
        else:
            if not resume or not progress.is_file():
                self._clear()

    def _clear(self) -> None:
        """Remove what an earlier run of lowbit left in ``dst`` (and nothing else)."""
        for p in list(self.dst.glob("lowbit-*-of-*.safetensors")) + [self.dst / INDEX, self.dst / PROGRESS]:
            p.unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)

    @property
    def complete(self) -> bool:
        return (self.dst / INDEX).is_file() and len(self.done) == len(self.units)

    def shard_name(self, i: int) -> str:
        return f"lowbit-{i:05d}-of-{len(self.units):05d}.safetensors"

    def _write(self, path: Path, data: bytes) -> None:
        try:
            atomic_write(path, data)
        except OSError as e:
            raise _disk_full(e, path) from e

    def write_unit(self, i: int, shell) -> list[str]:
        """Write unit ``i``'s frozen (or float) tensors to its shard; returns the tensor names."""
        tensors, metadata = payload(shell)
        path = self.dst / self.shard_name(i)
        self._write(path, serialize(tensors, metadata))
        return list(tensors)

    def save_state(self, name: str, obj) -> None:
        """Resume state (tensors, dicts, tuples) under ``.lowbit-work/name``."""
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_file(path) as tmp:
                torch.save(obj, tmp)
        except OSError as e:
            raise _disk_full(e, path) from e

    def load_state(self, name: str):
        path = self.work / name
        if not path.is_file():
            raise ValueError(f"dst: resume state {str(path)!r} is missing; pass resume=False to start over")
        return torch.load(path, weights_only=True)

    def drop_state(self, name: str) -> None:
        p = self.work / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def mark_done(self, unit: str, extra: dict) -> None:
        self.done.append(unit)
        state = {"key": self.key, "units": self.units, "done": self.done, **extra}
        self._write(self.dst / PROGRESS, json.dumps(state, indent=1).encode())

    def finish(self, src: Path, model_class: str, weight_map: dict[str, str], summary: dict) -> None:
        """Copy config/tokenizer files, then write the index (the mark of completion), then tidy up."""
        for name in _COPY:
            if (src / name).is_file():
                self._write(self.dst / name, (src / name).read_bytes())
        index = {"format": "lowbit-sharded", "model_class": model_class, "key": self.key,
                 "shards": [self.shard_name(i) for i in range(len(self.units))], "weight_map": weight_map,
                 "summary": summary}
        self._write(self.dst / INDEX, json.dumps(index, indent=1).encode())
        shutil.rmtree(self.work, ignore_errors=True)
