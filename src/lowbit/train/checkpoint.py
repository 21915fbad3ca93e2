"""Per-epoch checkpoints of a QAT run: written atomically, refused when they do not fit.

``DIR/checkpoint.pt`` is a ``torch.save`` file (loaded with ``weights_only=True``: tensors and
plain containers only) holding::

    {"format": "lowbit-qat-run", "version": 1, "recipe": RunConfig.recipe(), "world_size": int,
     "float_model": {"name", "fingerprint"}, "epoch": last finished epoch (0-based),
     "model": the QAT model's state_dict (float master weights, learned grids),
     "rng": lb.qat.rng_state(model), "train_state": {"epoch", "optimizer", "scheduler", "config"},
     "history": [per-epoch stats], "baseline": {"float": acc, "ptq": acc}}

It replaces the previous epoch's file with ``os.replace`` (via ``lowbit.checkpoint.atomic_write``),
so an interrupted or failed epoch always leaves the last good checkpoint in place.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from .config import recipe_differences

__all__ = ["FORMAT", "VERSION", "write_checkpoint", "read_checkpoint", "check_fits", "CHECKPOINT_NAME"]

FORMAT = "lowbit-qat-run"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def write_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` (see the module docstring) to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buf)
    atomic_write(path, buf.getvalue())
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a run checkpoint; ``ValueError`` naming the file if it is damaged or not one."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ValueError(f"{str(path)!r} could not be read as a lowbit train checkpoint (damaged or another "
                         f"kind of file): {type(e).__name__}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a lowbit train checkpoint (format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"{str(path)!r} is a lowbit train checkpoint of version {data.get('version')}, "
                         f"this lowbit reads version {VERSION}")
    return data


def check_fits(saved: dict, recipe: dict, fingerprint: str, world_size: int, path: str | os.PathLike) -> None:
    """Raise ``ValueError`` listing what differs between the checkpoint and this run."""
    diffs = recipe_differences(saved["recipe"], recipe)
    if saved["float_model"]["fingerprint"] != fingerprint:
        diffs.append(f"float model weights: checkpoint {saved['float_model']['fingerprint']}, "
                     f"this run {fingerprint} (the built-in model was retrained or replaced)")
    if saved["world_size"] != world_size:
        diffs.append(f"processes: checkpoint {saved['world_size']}, this run {world_size} "
                     "(the data split per process would differ)")
    if diffs:
        raise ValueError(f"checkpoint {str(path)!r} comes from a different model or recipe; it differs in: "
                         + "; ".join(diffs) + ". Resume with the same options, or choose another --out directory")
