"""``lowbit quantize --checkpoint DIR --recipe NAME --out DIR``: a Hugging Face checkpoint, streamed.

The strings of the command line become the typed arguments of :func:`lowbit.quantize_checkpoint`:
``--calibration`` is a file of token ids (``.pt``: ``torch.save`` of a ``[sequences, tokens]``
integer tensor; ``.safetensors``: its one tensor; ``.npy``) or a text file (``.txt``) tokenized with
the checkpoint's own tokenizer and cut into ``--sequences`` x ``--seq-len`` tokens;
``--memory-budget`` takes bytes with an optional K/M/G suffix (``4G``, ``4e9``).
"""
from __future__ import annotations

import argparse
import errno
from pathlib import Path

_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> float:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = _SUFFIX.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        raise ValueError(f"--memory-budget must be a size like 4G, 512M or 4e9 (bytes), got {text!r}") from None
    if value <= 0:
        raise ValueError(f"--memory-budget must be positive, got {text!r}")
    return value


def load_token_ids(path: str, src: Path, sequences: int, seq_len: int):
    import torch

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--calibration: {path!r} is not a file")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(src))
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise ValueError(f"--calibration: a .txt file is tokenized with the checkpoint's tokenizer, and "
                             f"{str(src)!r} has none that loads ({e}); pass token ids (.pt/.npy/.safetensors)") from e
        ids = torch.tensor(tok(p.read_text())["input_ids"], dtype=torch.long)
        n = min(sequences, ids.numel() // seq_len)
        if n < 1:
            raise ValueError(f"--calibration: {path!r} has {ids.numel()} tokens, fewer than one sequence of "
                             f"--seq-len {seq_len}")
        return ids[: n * seq_len].reshape(n, seq_len)
    if suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(p))
    if suffix == ".safetensors":
        import safetensors.torch

        tensors = safetensors.torch.load_file(str(p))
        if len(tensors) != 1:
            raise ValueError(f"--calibration: {path!r} must hold exactly one tensor of token ids, has {len(tensors)}")
        return next(iter(tensors.values()))
    obj = torch.load(p, weights_only=True)
    return obj


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR", help="a Hugging Face model directory (config.json, *.safetensors): "
                   "quantized block by block at bounded memory into the directory --out")
    p.add_argument("--memory-budget", metavar="BYTES", help="with --checkpoint: memory for weights and activations "
                   "(e.g. 4G); activations spill to disk beyond it")
    p.add_argument("--sequences", type=int, default=32, metavar="N", help="with --checkpoint and a .txt "
                   "--calibration: sequences (32)")
    p.add_argument("--seq-len", type=int, default=256, metavar="N", help="... of this many tokens (256)")
    p.add_argument("--no-resume", action="store_true", help="with --checkpoint: start over instead of resuming")


def run(args: argparse.Namespace) -> dict:
    from .. import demo, recipes
    from ..stream import quantize_checkpoint
    from ._minilm import check_unused

    check_unused(args)
    if args.out is None:
        raise ValueError("--out is required with --checkpoint: the output directory")
    if args.model is not None:
        raise ValueError("pass either --model or --checkpoint, not both")
    for flag in ("state_dict", "test", "include"):
        if getattr(args, flag, None):
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to --checkpoint")
    recipe = recipes.get(args.recipe)
    src = Path(args.checkpoint)
    calibration = load_token_ids(args.calibration, src, args.sequences, args.seq_len) if args.calibration else None
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    try:
        with demo.torch_threads(args.threads):
            return quantize_checkpoint(src, args.out, recipe, calibration, memory_budget=budget,
                                       resume=not args.no_resume, exclude=args.exclude, progress=not args.quiet)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ValueError(str(e.strerror or e)) from e
        raise


def render(result: dict) -> str:
    return (f"wrote {result['dst']}: {result['blocks']} blocks with recipe {result['recipe']} in {result['seconds']:.1f} s, "
            f"peak resident memory {result['peak_rss_bytes'] / 2**30:.2f} GiB"
            + (" (activations spilled to disk)" if result.get("spilled") else "")
            + (f"; resumed at unit {result['resumed_at']}" if result.get("resumed_at") else ""))
