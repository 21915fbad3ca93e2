"""On-disk cache of trained zoo models: keyed, atomic, shared safely between processes.

Directory: ``$LOWBIT_CACHE/zoo`` if the environment variable is set, else ``~/.cache/lowbit/zoo``.
Key: the first 16 hex digits of SHA-256 over a canonical JSON of everything that determines the
trained weights: the architecture (the model's ``repr``, which lists every layer's shape), the data
set, the training recipe, the torch major version and a format version. Changing any of these
trains a new model instead of loading a stale one.

Writes go to a temporary file in the same directory, are flushed to disk, then ``os.replace``-d
onto the final name, so a crash never leaves a half-written file under a name that is read. An
advisory lock (``fcntl.flock`` where available) lets one process train while others wait.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import tempfile
from typing import Any, Iterator

import torch

__all__ = ["cache_dir", "cache_key", "atomic_save", "load_entry", "file_lock"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def cache_dir() -> pathlib.Path:
    """``$LOWBIT_CACHE/zoo`` or ``~/.cache/lowbit/zoo`` (not created here)."""
    root = os.environ.get("LOWBIT_CACHE")
    base = pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "lowbit"
    return base / "zoo"


def cache_key(**parts: Any) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of ``parts`` plus torch major and format version."""
    payload = dict(parts, torch_major=torch.__version__.split(".")[0], format=FORMAT_VERSION)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def atomic_save(obj: dict, path: pathlib.Path) -> None:
    """``torch.save(obj)`` to ``path`` via a temporary file and ``os.replace`` (atomic on POSIX and Windows)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_entry(path: pathlib.Path) -> dict | None:
    """The saved dict at ``path``, or ``None`` if it is missing or unreadable (logged; it will be rebuilt)."""
    path = pathlib.Path(path)
    if not path.exists():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail
        log.warning("ignoring unreadable cache file %s (%s); it will be rebuilt", path, e)
        return None
    if not isinstance(entry, dict) or "state_dict" not in entry:
        log.warning("ignoring cache file %s: not a lowbit zoo entry; it will be rebuilt", path)
        return None
    return entry


@contextlib.contextmanager
def file_lock(path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed); a no-op without ``fcntl``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic replace alone keeps files whole
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
