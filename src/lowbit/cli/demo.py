"""lowbit demo: quantize a built-in model with a table of recipes and measure each against the
float model (accuracy, top-1 agreement, KL of the predictions, checkpoint size).

The model is trained on first use (seconds) and cached under $LOWBIT_CACHE or ~/.cache/lowbit.
"""
from __future__ import annotations

import argparse

from ._args import name_list, positive_int, table

NAME = "demo"
HELP = "quantize a built-in model with a table of recipes (the main job)"
ORDER = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..demo import BUILTIN_MODELS, DEFAULT_MODEL, DEMO_RECIPES

    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(BUILTIN_MODELS),
                   help=f"built-in model and data set (default {DEFAULT_MODEL})")
    p.add_argument("--recipes", type=name_list, default=list(DEMO_RECIPES), metavar="A,B,...",
                   help=f"recipes to run, comma-separated (default {','.join(DEMO_RECIPES)})")
    p.add_argument("--calibration-batches", type=positive_int, default=8, metavar="N",
                   help="calibration batches of 64 training samples (default 8)")
    p.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="torch threads (default 1: the built-in models are too small to gain from more)")
    p.add_argument("--formats", nargs="?", const="all", default=None, metavar="A,B,...",
                   help="instead of the recipes: the number-format table (int8, FP8, int4, NF4, MX, NVFP4 weights, "
                   "round to nearest and GPTQ) at their stored bits per weight; optionally only the named rows "
                   "(e.g. 'int8,nf4')")


def run(args: argparse.Namespace) -> dict:
    from ..demo import DEMO_RECIPES, run_demo

    if getattr(args, "formats", None) is not None:
        from ..demo.formats import run_formats

        if args.recipes != list(DEMO_RECIPES):
            raise ValueError("--recipes does not apply with --formats (the table runs number formats, not recipes)")
        names = None if args.formats == "all" else name_list(args.formats)
        return run_formats(args.model, names, calibration_batches=args.calibration_batches,
                           threads=args.threads).as_dict()
    return run_demo(args.model, args.recipes, calibration_batches=args.calibration_batches,
                    threads=args.threads).as_dict()


def render(result: dict) -> str:
    if "formats" in result:
        return _render_formats(result)
    f = result["float"]
    head = (f"{result['model']} on {result['dataset']}: float32 accuracy {100 * f['accuracy']:.2f}%, "
            f"{f['size_bytes']:,} bytes (safetensors)")
    rows = [[r["recipe"], f"{100 * r['accuracy']:.2f}%", f"{r['delta_points']:+.2f}", f"{100 * r['agreement']:.1f}%",
             f"{r['kl']:.2e}", f"{r['size_bytes']:,}", f"{r['ratio']:.1f}x", f"{r['seconds']:.2f}", r["description"]]
            for r in result["results"]]
    body = table(["recipe", "accuracy", "points", "agree", "KL", "bytes", "smaller", "time s", "what"], rows)
    note = ("points: accuracy change vs float; agree: top-1 predictions unchanged; KL: mean KL(float || quantized) "
            "of the softmax outputs (nats);\nbytes: the checkpoint lb.save writes; smaller: float file / checkpoint; "
            "time: quantize + calibrate + freeze.")
    return f"{head}\n\n{body}\n\n{note}"


def _render_formats(result: dict) -> str:
    head = (f"{result['model']} on {result['dataset']}: float32 accuracy {100 * result['float']['accuracy']:.2f}%; "
            "weights only, activations float")
    rows = [[r["format"], r["algorithm"], f"{r['bits_per_weight']:.2f}", f"{100 * r['accuracy']:.2f}%",
             f"{r['delta_points']:+.2f}", f"{100 * r['agreement']:.1f}%", f"{r['kl']:.2e}", f"{r['seconds']:.2f}"]
            for r in result["formats"]]
    body = table(["format", "weights by", "bits/weight", "accuracy", "points", "agree", "KL", "time s"], rows)
    note = ("bits/weight: stored codes + scales (float16; MX E8M0; NVFP4 E4M3 + a float32 per tensor) + zero points, "
            "over the quantized layers;\nrtn: round to nearest; gptq: GPTQ with act_order on the calibration batches.")
    if result.get("skipped"):
        note += "\nnot in this installation: " + ", ".join(sorted(result["skipped"]))
    return f"{head}\n\n{body}\n\n{note}"
