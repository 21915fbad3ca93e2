"""``lowbit <command>``: parses strings into typed objects and calls the library; nothing else.

Every command takes ``--json`` for a machine-readable result on stdout; progress and logs go to
stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from . import ops
from .spec import PerChannel, PerGroup, PerTensor, QuantSpec

log = logging.getLogger("lowbit")


def _grid_demo(args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen)
    x[0, 0] = 12.0  # one outlier, as real activations have
    rows = []
    for bits in (8, 4, 2):
        for name, g in (("per-tensor", PerTensor()), ("per-channel", PerChannel(0)), ("per-group-32", PerGroup(32, -1))):
            spec = QuantSpec(bits=bits, granularity=g)
            scale, zp = ops.choose_qparams(x, spec, "maxabs")
            err = ops.quant_error(x, spec, scale, zp)
            rows.append({"bits": bits, "granularity": name, "sqnr_db": round(err.sqnr_db, 2),
                         "mse": err.mse, "clip_fraction": err.clip_fraction})
    return {"tensor": [64, 256], "results": rows}


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    widths = [max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(_fmt(r[k]).ljust(w) for k, w in zip(keys, widths)))


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- lowbit analyze ---------------------------------------------------------------------------
def _analyze(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from . import recipes, zoo
    from .analysis import analyze

    recipe = recipes.get(args.recipe)
    if args.samples is None:
        args.samples = 64 if args.model == "minilm" else 1000
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    log.info("lowbit analyze: loading %s", args.model)
    if args.model == "minilm":
        model, sentences = zoo.get("minilm")
        calib = [(b,) for b in zoo.tokenized_batches(model, sentences[:128], batch_size=32)]
        batches = [(b,) for b in zoo.tokenized_batches(model, sentences[128:128 + args.samples], batch_size=32)]
        labels, metric = None, "cosine"
    else:
        model, data = zoo.get(args.model)
        calib = zoo.calibration_batches(data)
        batches = list(data.x_test[: args.samples].split(256))
        labels, metric = data.y_test[: args.samples], "kl"
    log.info("lowbit analyze: quantizing with %s (%s)", recipe.name, recipe.description)
    q = recipe.apply(model, calib, freeze=False)   # unfrozen: a mixed-precision plan can still be applied
    log.info("lowbit analyze: analysing %d layers on %d samples", len(q.lowbit_info.quantized),
             sum(len(b[0]["input_ids"]) if isinstance(b, tuple) else len(b) for b in batches))
    report = analyze(model, q, batches, labels=labels, metric=metric, budget=args.budget)
    out = Path(args.out)
    report.to_json(out / "report.json")
    report.to_html(out / "report.html")
    log.info("lowbit analyze: wrote %s and %s", out / "report.json", out / "report.html")
    summary = {k: v for k, v in report.model.items() if k != "quantization"}
    return {"model": args.model, "recipe": args.recipe, "out": str(out), "summary": summary,
            "mixed": None if report.mixed is None else {k: v for k, v in report.mixed.items() if k != "candidates"},
            "notes": report.notes, "results": report.table()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show quantization at work")
    demo.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    demo.set_defaults(run=_grid_demo)
    an = sub.add_parser("analyze", help="where the quantization error comes from: report.json and report.html")
    an.add_argument("--model", choices=("digits", "mnist1d", "minilm"), default="digits", help="built-in model")
    an.add_argument("--recipe", default="w8a8", help="a named recipe of lowbit.recipes (w8a8, w4a8, w4g128, ...)")
    an.add_argument("--out", required=True, help="directory for report.json and report.html")
    an.add_argument("--samples", type=int, default=None,
                    help="test inputs to analyse (default 1000; for minilm, 64 sentences)")
    an.add_argument("--budget", type=float, default=None,
                    help="average bits per weight for a mixed-precision suggestion (e.g. 4)")
    an.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    an.set_defaults(run=_analyze)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        result = args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        _print_table(result["results"])
    return 0
