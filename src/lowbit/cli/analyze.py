"""``lowbit analyze``: where a model's quantization error comes from (parsing and display only).

    lowbit analyze --model digits --recipe w8a8 --out reports/digits [--budget 4] [--json]
    lowbit analyze --model minilm --recipe w8a8 --out reports/minilm      # cosine instead of KL
    lowbit analyze --model mymodels:make_net --state-dict net.pt --calibration calib.pt \
        [--test test.pt] --out reports/net       # a user model, as `lowbit quantize` takes it
    lowbit analyze --model ./my-gpt2 --calibration ids.pt --out reports/gpt2   # save_pretrained directory

Quantizes the model with a named recipe of :mod:`lowbit.recipes` (calibrated on the training
split, not frozen), runs :func:`lowbit.analyze` on the test split and writes ``report.json`` and a
self-contained ``report.html`` to ``--out``. Nothing is written if the analysis fails.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import _user
from ._args import fmt, positive_int, table

NAME = "analyze"
HELP = "error anatomy, sensitivity, KL, certified bounds and bits of a quantized built-in or user model"
ORDER = 40

log = logging.getLogger("lowbit.cli.analyze")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", metavar="NAME|package.module:factory",
                   help="a built-in model (digits, mnist1d, minilm), a user model factory (with --state-dict, "
                        "--calibration, optionally --test) or a Hugging Face model directory (with --calibration)")
    p.add_argument("--recipe", default="w8a8", help="a named recipe of lowbit.recipes (w8a8, w4a8, w4g128, ...)")
    p.add_argument("--out", required=True, type=Path, help="directory for report.json and report.html")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="test inputs to analyse (default 1000; for minilm, 64 sentences)")
    p.add_argument("--budget", type=float, default=None,
                   help="average bits per weight for a mixed-precision suggestion (e.g. 4)")
    _user.add_arguments(p)


def run(args: argparse.Namespace) -> dict:
    from .. import recipes, zoo
    from ..analysis import analyze

    samples = args.samples or (64 if args.model == "minilm" else 1000)
    log.info("lowbit analyze: loading %s", args.model)
    if _user.is_user_model(args.model):
        recipe = recipes.get(args.recipe)
        model, calib, test = _user.load(args)
        if test is not None:
            batches = list(test[0][:samples].split(args.batch_size))
            labels = None if test[1] is None else test[1][:samples]
        else:                 # no test set: analyse on the calibration inputs
            batches, labels = calib, None
        metric = "kl" if labels is not None else "auto"
    elif args.model not in ("digits", "mnist1d", "minilm"):
        raise ValueError(f"--model must be digits, mnist1d, minilm, package.module:factory or a Hugging Face "
                         f"model directory, got {args.model!r}")
    elif args.model == "minilm":
        from ..transformer import calibration_batches

        _user.check_unused(args, args.model)
        recipe = recipes.get(args.recipe, family="transformer")   # as `lowbit quantize --model minilm`
        model, sentences = zoo.get("minilm")
        calib = [(b,) for b in calibration_batches(model, sentences[:128])]   # unpadded
        batches = [(b,) for b in zoo.tokenized_batches(model, sentences[128:128 + samples], batch_size=32)]
        labels, metric = None, "cosine"
    else:
        _user.check_unused(args, args.model)
        recipe = recipes.get(args.recipe)
        model, data = zoo.get(args.model)
        calib = zoo.calibration_batches(data)
        batches = list(data.x_test[:samples].split(256))
        labels, metric = data.y_test[:samples], "kl"
    log.info("lowbit analyze: quantizing with %s (%s)", recipe.name, recipe.description)
    q = recipe.apply(model, calib, freeze=False)   # unfrozen: a mixed-precision plan can still be applied
    log.info("lowbit analyze: analysing %d layers", len(q.lowbit_info.quantized))
    report = analyze(model, q, batches, labels=labels, metric=metric, budget=args.budget)
    report.to_json(args.out / "report.json")
    report.to_html(args.out / "report.html")
    log.info("lowbit analyze: wrote %s and %s", args.out / "report.json", args.out / "report.html")
    summary = {k: v for k, v in report.model.items() if k != "quantization"}
    return {"model": args.model, "recipe": args.recipe, "resolved_recipe": recipe.name, "out": str(args.out),
            "summary": summary,
            "mixed": None if report.mixed is None else {k: v for k, v in report.mixed.items() if k != "candidates"},
            "notes": report.notes, "coverage": report.coverage, "bound_unavailable": report.bound_unavailable,
            "results": report.table()}


def render(result: dict) -> str:
    s = result["summary"]
    recipe = result["recipe"]
    if result.get("resolved_recipe", recipe) != recipe:
        recipe += f" -> {result['resolved_recipe']}"
    head = f"{result['model']} with {recipe}: {s['samples']} inputs, {s['layers']} quantized layers"
    if "accuracy_float" in s:
        head += f", accuracy {100 * s['accuracy_float']:.2f}% -> {100 * s['accuracy_quant']:.2f}%"
    if "kl" in s:
        head += f"\nKL {s['kl']:.3g} (predicted {s['kl_predicted']:.3g}, off by {100 * s['kl_relative_error']:.1f}%)"
    else:
        head += f"\n{s['metric']} {s['divergence']:.3g}"
    if s.get("certified_fraction") is not None:
        head += (f"; certified {100 * s['certified_fraction']:.1f}% (worst-case rounding), "
                 f"{100 * s.get('certified_fraction_exact_rounding', 0.0):.1f}% (exact rounding)")
    head += f"; {s['bits_per_weight']:.2f} bits per weight entropy-coded"
    keys = ["layer", "bits", "weights", "weight_sqnr_db", "weight_clip_share", "input_sqnr_db", "input_clip_share",
            "sensitivity", "rank"]
    body = table(keys, [[fmt(r.get(k)) if r.get(k) is not None else "-" for k in keys] for r in result["results"]])
    mixed = ""
    if result.get("mixed"):
        m = result["mixed"]
        mixed = f"\n\nmixed precision at {m['budget']:g} bits: {m['bits']} ({m['average_bits']:.2f} bits on average)"
    notes = "".join(f"\nnote: {n}" for n in result.get("notes", []))
    return f"{head}\n\n{body}{mixed}{notes}\n\nwrote {result['out']}/report.json and report.html"
