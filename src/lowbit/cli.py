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


# -- lowbit export ------------------------------------------------------------------------------
# Shaped like a command module of the cli package (NAME/HELP/add_arguments/run/render), so it moves
# into src/lowbit/cli/export.py unchanged.
EXPORT_HELP = "quantize a built-in model with a recipe, export it as QDQ ONNX and check it with ONNX Runtime"


def _export_add_arguments(p: argparse.ArgumentParser) -> None:
    from .recipes import names

    p.add_argument("--model", required=True, choices=["digits", "mnist1d", "minilm"], help="a built-in model")
    p.add_argument("--recipe", default="w8a8", metavar="NAME", help=f"one of {', '.join(names())} (default w8a8)")
    p.add_argument("--out", required=True, metavar="PATH", help="the .onnx file to write (its directory must exist)")
    p.add_argument("--integer", action="store_true",
                   help="write int8-able Linear layers with MatMulInteger (ONNX Runtime's int8 GEMM) instead of QDQ")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 21)")


def _export_run(args: argparse.Namespace) -> dict:
    import time

    from . import recipes, zoo
    from .export import compare_with_onnx, export_onnx

    recipe = recipes.get(args.recipe)
    from pathlib import Path

    out = Path(args.out)
    if out.suffix != ".onnx":
        raise ValueError(f"--out must end in .onnx, got {args.out!r}")
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise ValueError(f"--out: directory {str(out.parent)!r} does not exist; create it first")
    t0 = time.perf_counter()
    if args.model == "minilm":
        st = zoo.load_minilm()
        model = zoo.transformer_of(st)
        texts = zoo.sentences()
        batches = zoo.tokenized_batches(st, texts[:128], batch_size=32)
        check = zoo.tokenized_batches(st, texts[256:320], batch_size=64)[0]
    else:
        model, dataset = zoo.get(args.model)
        batches = zoo.calibration_batches(dataset)
        check = dataset.x_test
    log.info("quantizing %s with %s", args.model, recipe.name)
    q = recipe.apply(model, batches)
    t1 = time.perf_counter()
    log.info("exporting to %s", args.out)
    info = export_onnx(q, batches[0], args.out, opset=args.opset, integer=args.integer)
    t2 = time.perf_counter()
    agree = compare_with_onnx(q, args.out, check)
    with torch.no_grad():
        out = q(**check) if isinstance(check, dict) else q(check)
        ref = model(**check) if isinstance(check, dict) else model(check)
    first = out[0] if not isinstance(out, torch.Tensor) else out
    ref = ref[0] if not isinstance(ref, torch.Tensor) else ref
    quant_err = float((first - ref).norm() / ref.norm())
    row = {"model": args.model, "recipe": recipe.name, "layers": len(info.layers), "int4_layers": len(info.int4),
           "integer_layers": len(info.integer), "size_bytes": info.size_bytes,
           "onnx_vs_lowbit_rel_l2": agree["rel_l2"], "lowbit_vs_float_rel_l2": quant_err}
    return {**info.as_dict(), "model": args.model, "recipe": recipe.name,
            "check": {**agree, "lowbit_vs_float_rel_l2": quant_err},
            "seconds": {"quantize": t1 - t0, "export": t2 - t1}, "results": [row]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show quantization at work")
    demo.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    demo.set_defaults(run=_grid_demo)
    export = sub.add_parser("export", help=EXPORT_HELP)
    export.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    _export_add_arguments(export)
    export.set_defaults(run=_export_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        result = args.run(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        _print_table(result["results"])
    return 0
