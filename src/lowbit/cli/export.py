"""lowbit export: quantize a built-in or user model with a recipe and write it as a QDQ ONNX graph
(checked against ONNX Runtime: ``lowbit.export.export_builtin`` / ``export_model``), a GGUF file
for llama.cpp or a compressed-tensors directory for transformers/vLLM
(``lowbit.export.builtin_formats``; built-in MiniLM).

    lowbit export --model mnist1d --recipe w8a8 --out mnist1d-w8a8.onnx
    lowbit export --model minilm --recipe w8a8 --integer --out minilm.onnx   # MatMulInteger layers
    lowbit export --model mymodels:make_net --state-dict net.pt --calibration calib.pt --out net.onnx
    lowbit export --model ./my-model --calibration inputs.pt --out model.onnx    # save_pretrained directory
    lowbit export --model minilm --recipe gguf-q4_k --format gguf --out minilm-q4_k.gguf
    lowbit export --model minilm --recipe w4g128-gptq --format compressed-tensors --out minilm-w4g128/
"""
from __future__ import annotations

import argparse

from . import _user
from ._args import table

NAME = "export"
HELP = "quantize a built-in or user model with a recipe and export it (ONNX, GGUF or compressed-tensors)"
ORDER = 50


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..export.builtin import BUILTIN_EXPORTS
    from ..recipes import names

    p.add_argument("--model", required=True, metavar="NAME|package.module:factory",
                   help=f"a built-in model ({', '.join(BUILTIN_EXPORTS)}) or a user model factory (with --state-dict "
                        "and --calibration; the first calibration batch is the example input, --test's inputs the check)")
    p.add_argument("--recipe", default="w8a8", metavar="NAME", help=f"one of {', '.join(names())} (default w8a8)")
    p.add_argument("--format", default="onnx", choices=("onnx", "gguf", "compressed-tensors"),
                   help="onnx (QDQ graph, default), gguf (llama.cpp; --model minilm) or compressed-tensors "
                   "(a Hugging Face directory for transformers/vLLM; --model minilm)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="the .onnx/.gguf file or the compressed-tensors directory to write (its parent must exist)")
    p.add_argument("--integer", action="store_true",
                   help="write int8-able Linear layers with MatMulInteger (ONNX Runtime's int8 GEMM) instead of QDQ")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 21)")
    _user.add_arguments(p)


def run(args: argparse.Namespace) -> dict:
    from ..export.builtin import BUILTIN_EXPORTS, export_builtin, export_model
    from ..recipes import get

    if args.format != "onnx":
        from ..export.builtin_formats import export_builtin_format

        if args.integer or args.opset is not None:
            raise ValueError("--integer and --opset are for --format onnx")
        if _user.is_user_model(args.model):
            raise ValueError("--format gguf and compressed-tensors take the built-in --model minilm; for a user "
                             "model call lb.export_gguf / lb.export_compressed_tensors from Python")
        return export_builtin_format(args.model, args.recipe, args.out, args.format)
    if _user.is_user_model(args.model):
        model, batches, test = _user.load(args)
        check = test[0][:args.batch_size] if test is not None else batches[0]
        return export_model(args.model, model, get(args.recipe), batches, check, args.out, opset=args.opset,
                            integer=args.integer)
    if args.model not in BUILTIN_EXPORTS:
        raise ValueError(f"--model must be one of {', '.join(BUILTIN_EXPORTS)}, package.module:factory or a model directory, "
                         f"got {args.model!r}")
    _user.check_unused(args, args.model)
    return export_builtin(args.model, args.recipe, args.out, opset=args.opset, integer=args.integer)


def render(result: dict) -> str:
    rows = result["results"]
    header = list(rows[0])
    return table(header, [[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in header] for r in rows])
