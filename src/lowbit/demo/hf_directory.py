"""A Hugging Face model directory as a float model: ``config.json`` plus safetensors weights, as
``model.save_pretrained(dir)`` writes them (one ``model.safetensors`` or sharded with an index).

The class is the one ``config.json`` names in ``architectures`` (e.g. ``GPT2LMHeadModel``), taken
from the installed ``transformers``; it is loaded offline (``local_files_only``), in float32, in
eval mode, with the KV cache off (the commands run whole sequences; a cache object in the outputs
would stop ONNX export). Refused, with the reason and the fix: a directory without ``config.json``, one whose
weights are only pickles (``pytorch_model.bin``: unpickling can run code, so lowbit does not load
them), and an architecture ``transformers`` does not ship (custom code: lowbit never sets
``trust_remote_code``; build such a model with ``--model package.module:factory``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_hf_directory"]

_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _architecture(path: Path, arg: str) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{arg} {str(path)!r}: no config.json in this directory; a Hugging Face model directory "
                         "holds config.json and model.safetensors (write one with model.save_pretrained(dir))")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{arg} {str(path)!r}: config.json is not readable JSON ({e})") from e
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ValueError(f"{arg} {str(path)!r}: config.json names no model class (\"architectures\": [...]); "
                         "save the model with model.save_pretrained(dir), which writes it")
    return archs[0]


def load_hf_directory(path: str | os.PathLike, arg: str = "model") -> nn.Module:
    """The float model saved in the Hugging Face directory ``path`` (float32, eval mode).

    ``ValueError`` naming ``arg`` and the fix for a missing directory or ``config.json``, pickle-only
    weights, an architecture ``transformers`` does not provide, or weights that do not load.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{arg} {str(path)!r} is not a directory: pass a Hugging Face model directory "
                         "(config.json + model.safetensors)")
    arch = _architecture(path, arg)
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in _PICKLES for p in path.glob(pattern))
        if pickles:
            raise ValueError(f"{arg} {str(path)!r} holds only pickled weights ({', '.join(pickles[:3])}); lowbit loads "
                             "safetensors only (unpickling a file can run code). Convert once, in an environment you "
                             "trust: Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
        raise ValueError(f"{arg} {str(path)!r} holds no weights (*.safetensors); write them with "
                         "model.save_pretrained(dir)")
    try:
        import transformers
    except ImportError as e:
        raise ValueError(f"{arg} {str(path)!r}: loading a Hugging Face directory needs transformers "
                         "(pip install 'lowbit[transformers]')") from e
    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{arg} {str(path)!r}: config.json names {arch!r}, which transformers "
                         f"{transformers.__version__} does not provide (a model with custom code?); lowbit does not "
                         "run code from model directories: build it with --model package.module:factory")
    try:
        model = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; name the directory and the cause
        detail = " ".join(str(e).split())[:400]
        raise ValueError(f"{arg} {str(path)!r}: transformers could not load {arch} from it "
                         f"({type(e).__name__}: {detail})") from e
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False   # whole sequences in and logits out: no KV cache object in the outputs
    return model.eval()
