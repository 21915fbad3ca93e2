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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show quantization at work")
    demo.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    demo.set_defaults(run=_grid_demo)
    from .cli_train import add_parser as _add_train
    _add_train(sub)
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
