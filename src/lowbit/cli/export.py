"""lowbit export: quantize a built-in model with a recipe, write it as a QDQ ONNX graph (checked
against ONNX Runtime, ``lowbit.export.export_builtin``), a GGUF file for llama.cpp or a
compressed-tensors directory for transformers/vLLM (``lowbit.export.builtin_formats``).

    lowbit export --model mnist1d --recipe w8a8 --out mnist1d-w8a8.onnx
    lowbit export --model minilm --recipe w8a8 --integer --out minilm.onnx   # MatMulInteger layers
    lowbit export --model minilm --recipe gguf-q4_k --format gguf --out minilm-q4_k.gguf
    lowbit export --model minilm --recipe w4g128-gptq --format compressed-tensors --out minilm-w4g128/
"""
from __future__ import annotations

import argparse

from ._args import table

NAME = "export"
HELP = "quantize a built-in model with a recipe and export it (ONNX, GGUF or compressed-tensors)"
ORDER = 50


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..export.builtin import BUILTIN_EXPORTS
    from ..recipes import names

    p.add_argument("--model", required=True, choices=BUILTIN_EXPORTS, help="a built-in model")
    p.add_argument("--recipe", default="w8a8", metavar="NAME", help=f"one of {', '.join(names())} (default w8a8)")
    p.add_argument("--format", default="onnx", choices=("onnx", "gguf", "compressed-tensors"),
                   help="onnx (QDQ graph, default), gguf (llama.cpp; --model minilm) or compressed-tensors "
                   "(a Hugging Face directory for transformers/vLLM; --model minilm)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="the .onnx/.gguf file or the compressed-tensors directory to write (its parent must exist)")
    p.add_argument("--integer", action="store_true",
                   help="write int8-able Linear layers with MatMulInteger (ONNX Runtime's int8 GEMM) instead of QDQ")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 21)")


def run(args: argparse.Namespace) -> dict:
    from ..export.builtin import export_builtin

    if args.format != "onnx":
        from ..export.builtin_formats import export_builtin_format

        if args.integer or args.opset is not None:
            raise ValueError("--integer and --opset are for --format onnx")
        return export_builtin_format(args.model, args.recipe, args.out, args.format)
    return export_builtin(args.model, args.recipe, args.out, opset=args.opset, integer=args.integer)


def render(result: dict) -> str:
    rows = result["results"]
    header = list(rows[0])
    return table(header, [[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in header] for r in rows])
