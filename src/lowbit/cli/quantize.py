"""lowbit quantize: one recipe on one model, saved as a checkpoint (lb.save), with a summary.

Built-in models (--model digits|mnist1d) calibrate on their own training data. A user model is
--model package.module:factory (importable from the current directory or PYTHONPATH; called
with no arguments) plus --state-dict FILE (torch.save(model.state_dict()) or .safetensors), or
--model DIR, a Hugging Face model directory (config.json + safetensors, from save_pretrained),
calibrated on --calibration FILE.pt: torch.save(x) of a tensor of inputs (N, ...), split into
--batch-size rows, or of a list of batches. Weight-only recipes (w4g128, w4g32) need no
calibration. --test FILE.pt (a tensor of inputs, or (inputs, labels)) adds accuracy and the
agreement with the float model; without it they are measured on the calibration inputs.

--checkpoint DIR (a Hugging Face model directory) instead of --model quantizes the checkpoint block
by block at bounded memory into the directory --out (:func:`lowbit.quantize_checkpoint`; resumable;
--calibration is then a file of token ids or a .txt file, --memory-budget a size such as 4G).

--model minilm (the sentence-embedding transformer) is handled by :mod:`lowbit.cli._minilm`:
it evaluates embedding agreement and encode speed, and --out is optional.
"""
from __future__ import annotations

import argparse

from . import _checkpoint, _minilm, _user as _user_model
from ._args import fmt, is_factory, positive_int

NAME = "quantize"
HELP = "quantize one model with one recipe and save the checkpoint"
ORDER = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..demo import BUILTIN_MODELS
    from ..recipes import names

    p.add_argument("--model", metavar="NAME|package.module:factory",
                   help=f"a built-in model ({', '.join(sorted(BUILTIN_MODELS))}), a user model factory or a "
                   "Hugging Face model directory (or --checkpoint DIR)")
    p.add_argument("--recipe", default="w8a8", metavar="NAME", help=f"one of {', '.join(names())} (default w8a8)")
    p.add_argument("--out", metavar="PATH", help="checkpoint to write (.safetensors); its directory must exist "
                   "(required, except with --model minilm)")
    p.add_argument("--state-dict", metavar="PATH", help="weights of a user model")
    p.add_argument("--calibration", metavar="PATH", help="calibration inputs of a user model (.pt)")
    p.add_argument("--test", metavar="PATH", help="test inputs (and labels) of a user model (.pt)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="rows per calibration batch (64)")
    p.add_argument("--calibration-batches", type=positive_int, default=8, metavar="N",
                   help="built-in models: calibration batches of 64 training samples (default 8)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="torch threads (default: torch's)")
    p.add_argument("--include", action="append", metavar="GLOB", help="quantize only these modules (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="keep these modules float (repeatable)")
    _minilm.add_arguments(p)
    _checkpoint.add_arguments(p)


def run(args: argparse.Namespace) -> dict:
    from .. import demo, recipes

    if args.checkpoint is not None:
        return {"checkpoint": args.checkpoint, **_checkpoint.run(args)}
    if args.model is None:
        raise ValueError("--model (a built-in or user model) or --checkpoint (a Hugging Face directory) is required")
    if args.memory_budget is not None or args.no_resume:
        raise ValueError("--memory-budget and --no-resume apply to --checkpoint only")
    if args.model == _minilm.NAME:
        with demo.torch_threads(args.threads):
            return _minilm.run(args)
    _minilm.check_unused(args)
    if args.out is None:
        raise ValueError("--out is required: the checkpoint file to write (e.g. --out model.safetensors)")
    recipe = recipes.get(args.recipe)
    demo.check_out_path(args.out, keep=[args.state_dict, args.calibration, args.test])   # before any work
    with demo.torch_threads(args.threads):
        return {"model": args.model, **_dispatch(args, recipe)}


def _dispatch(args: argparse.Namespace, recipe) -> dict:
    """``package.module:factory`` -> the user-model path; any other name -> the built-in model of
    that name (``lowbit.demo.BUILTIN_MODELS``: each kind brings its loader, calibration batches and
    metrics, so a new kind such as ``minilm`` registers there and needs nothing here)."""
    if is_factory(args.model) or _user_model.is_directory(args.model):   # a factory or a Hugging Face directory
        return _user(args, recipe)
    return _builtin(args, recipe)


def _builtin(args: argparse.Namespace, recipe) -> dict:
    from .. import demo

    if args.model not in demo.BUILTIN_MODELS:
        raise ValueError(f"--model must be one of {sorted(demo.BUILTIN_MODELS) + [_minilm.NAME]}, or "
                         f"package.module:factory with --state-dict; got {args.model!r}")
    entry = demo.builtin(args.model)
    for flag in ("state_dict", "test"):
        if getattr(args, flag):
            raise ValueError(f"--{flag.replace('_', '-')} is for user models; built-in model {args.model!r} brings "
                             "its own weights and data")
    model, data = entry.load()
    batches = (demo.load_calibration_file(args.calibration, args.batch_size) if args.calibration
               else entry.calibration(data, args.calibration_batches))
    return demo.quantize_model(model, recipe, batches, args.out, include=args.include, exclude=args.exclude,
                               evaluate=lambda f, q: entry.evaluate(f, q, data))


def _user(args: argparse.Namespace, recipe) -> dict:
    from .. import demo

    model, batches, test = _user_model.load(args, need_calibration=False)
    return demo.quantize_model(model, recipe, batches, args.out, include=args.include, exclude=args.exclude,
                               evaluate=lambda f, q: demo.user_metrics(f, q, test, batches))


def render(result: dict) -> str:
    if "checkpoint" in result:
        return _checkpoint.render(result)
    if result.get("model") == _minilm.NAME:
        return _minilm.render(result)
    lines = [f"wrote {result['out']}: {result['size_bytes']:,} bytes ({result['ratio']:.1f}x smaller than the "
             f"float state dict, {result['float_size_bytes']:,} bytes)",
             f"recipe {result['recipe']}: {result['description']}",
             f"quantized {len(result['quantized'])} layers; folded {len(result['folded'])} BatchNorms"]
    cov = result.get("coverage") or {}
    floats = cov.get("float", result["skipped"])
    for name, why in floats.items():
        mark = "  WARNING Linear-like layer stays float: " if name in cov.get("linear_like_float", ()) else "  float: "
        lines.append(f"{mark}{name}: {why}")
    for name, why in cov.get("untied", {}).items():
        lines.append(f"  untied: {name}: {why}")
    metrics = [k for k in ("accuracy", "float_accuracy", "agreement", "kl", "eval_on") if result.get(k) is not None]
    if metrics:
        lines.append("  ".join(f"{k} {fmt(result[k])}" for k in metrics))
    return "\n".join(lines)
