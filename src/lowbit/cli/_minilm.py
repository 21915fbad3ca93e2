"""``lowbit quantize --model minilm``: the sentence-embedding model (all-MiniLM-L6-v2).

Quantizes the transformer with the recipe's transformer variant (``w8a8`` -> ``w8a8-smooth``; see
``lowbit.recipes``), calibrating on built-in sentences that are not evaluated (or, with
``--calibrate-on file``, on every 4th line of --sentences, then left out of the evaluation),
evaluates on the built-in 512 sentences or on --sentences FILE (UTF-8, one sentence per line),
and times the encode of the float model and of the quantized one on --backend (``auto``: the
first that works in the order measured fastest; the result names it). --out FILE.safetensors
also saves the quantized transformer (lb.save).
"""
from __future__ import annotations

import argparse

from ._args import fmt, positive_int

NAME = "minilm"
_USER_MODEL_FLAGS = ("state_dict", "test", "calibration", "include", "exclude")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--model minilm")
    g.add_argument("--sentences", metavar="FILE", help="evaluate on these sentences (UTF-8 text, one per line) "
                   "instead of the built-in 512")
    g.add_argument("--calibrate-on", choices=("builtin", "file"), default="builtin",
                   help="calibration sentences: built-in ones not evaluated (default), or every 4th line of "
                   "--sentences")
    g.add_argument("--calibration-size", type=positive_int, default=512, metavar="N",
                   help="calibration sentences (default 512)")
    g.add_argument("--backend", default="auto", metavar="NAME",
                   help="what runs the quantized model: auto (the first that works of fast-ort, onnxruntime, "
                   "fast-torch, torch), fastest (time each), or one of those names, or integer")
    g.add_argument("--repeats", type=positive_int, default=1, metavar="N", help="timed encodes, best kept (default 1)")


def check_unused(args: argparse.Namespace) -> None:
    """Other models: the minilm options must not be given (they would be silently ignored)."""
    for flag, default in (("sentences", None), ("calibrate_on", "builtin"), ("calibration_size", 512),
                          ("backend", "auto"), ("repeats", 1)):
        if getattr(args, flag, default) != default:
            raise ValueError(f"--{flag.replace('_', '-')} is for --model minilm only")


def run(args: argparse.Namespace) -> dict:
    from ..transformer import quantize_minilm, read_sentences

    for flag in _USER_MODEL_FLAGS:
        if getattr(args, flag, None):
            raise ValueError(f"--{flag.replace('_', '-')} is not used with --model minilm (it brings its own weights "
                             "and sentences; give your sentences with --sentences FILE)")
    out = None
    if args.out is not None:
        from ..demo import check_out_path

        out = check_out_path(args.out, keep=[args.sentences])
    sentences = read_sentences(args.sentences) if args.sentences else None
    result = quantize_minilm(args.recipe, sentences, calibration=args.calibrate_on,
                             calibration_size=args.calibration_size, backend=args.backend, threads=args.threads,
                             repeats=args.repeats, keep_model=out is not None)
    q = result.pop("quantized_model", None)
    if out is not None:
        from ..checkpoint import save

        save(q, out)
        result["out"] = str(out)
        result["checkpoint_bytes"] = out.stat().st_size
    return result


def render(r: dict) -> str:
    f, q = r["float"], r["quantized"]
    lines = [f"minilm, recipe {r['recipe']} -> {r['resolved_recipe']}: {r['description']}",
             f"{r['sentences']} sentences; calibrated on {r['calibration_sentences']} ({r['calibration_source']})",
             f"cosine to float: mean {fmt(q['cosine_mean'])}, min {fmt(q['cosine_min'])}; "
             f"Spearman {fmt(q['spearman'])}",
             f"encode: float {f['seconds']:.2f} s, quantized {q['seconds']:.2f} s on {r['backend']} "
             f"({q['speedup']:.2f}x); quantizing took {q['quantize_seconds']:.1f} s",
             f"size: {q['size_bytes']:,} bytes (float {f['size_bytes']:,}); quantized weights {q['weight_bytes']:,} "
             f"bytes ({q['float_weight_bytes'] / q['weight_bytes']:.1f}x smaller)"]
    if "out" in r:
        lines.append(f"wrote {r['out']} ({r['checkpoint_bytes']:,} bytes)")
    return "\n".join(lines)
