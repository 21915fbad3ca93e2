"""``lowbit export --format gguf | compressed-tensors``: the built-in all-MiniLM-L6-v2 quantized with a
recipe and written for llama.cpp (GGUF) or transformers/vLLM (compressed-tensors), with a check.

GGUF: the file is read back with the ``gguf`` package and each quantized tensor's dequantized
values are compared with lowbit's (they are equal where a block type holds the grid).
compressed-tensors: transformers loads the directory and its outputs are compared with lowbit's.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .. import recipes, zoo
from .compressed_tensors import export_compressed_tensors
from .gguf import export_gguf

__all__ = ["export_builtin_format", "FORMATS"]

log = logging.getLogger(__name__)

FORMATS = ("gguf", "compressed-tensors")


def _gguf_check(q, path: Path) -> dict:
    import gguf
    import numpy as np

    from .gguf import _collect, _hf_model, _name_map

    hf = _hf_model(q)
    to_gguf = _name_map(hf.config.model_type, hf.config)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    worst, n = 0.0, 0
    for name, src in _collect(hf).items():
        g = to_gguf(name)
        if g is None or not hasattr(src, "qweight") or g not in tensors:
            continue
        t = tensors[g]
        if t.tensor_type.name not in ("Q8_0", "Q4_0", "Q4_K"):
            continue
        want = src.qweight.dequantize().numpy()
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        worst, n = max(worst, float(np.abs(got - want).max())), n + 1
    return {"quantized_tensors_checked": n, "max_abs_diff_vs_lowbit": worst}


def _ct_check(q, path: Path, batch: dict) -> dict:
    from transformers import AutoModel, CompressedTensorsConfig

    hf = AutoModel.from_pretrained(str(path), local_files_only=True,
                                   quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    with torch.no_grad():
        ours, theirs = q(**batch).last_hidden_state, hf(**batch).last_hidden_state
    return {"transformers_vs_lowbit_rel_l2": float((ours - theirs).norm() / ours.norm())}


def export_builtin_format(model: str, recipe: str, out: str | Path, fmt: str) -> dict:
    """Quantize built-in ``model`` (``minilm``) with ``recipe`` and write it to ``out`` in ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if model != "minilm":
        raise ValueError(f"--format {fmt} writes Hugging Face transformer models; use --model minilm (got {model!r})")
    r = recipes.get(recipe)
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"out: directory {str(parent)!r} does not exist; create it first")
    if fmt == "gguf" and out.suffix != ".gguf":
        raise ValueError(f"out must end in .gguf, got {str(out)!r}")
    t0 = time.perf_counter()
    st = zoo.load_minilm()
    bert = zoo.transformer_of(st)
    texts = zoo.sentences()
    batches = zoo.tokenized_batches(st, texts[:128], batch_size=32)
    log.info("quantizing minilm with %s", r.name)
    q = r.apply(bert, batches)
    t1 = time.perf_counter()
    if fmt == "gguf":
        info = export_gguf(q, out, tokenizer=st.tokenizer)
        check = _gguf_check(q, out)
        row = {"model": model, "recipe": r.name, "format": fmt, "size_bytes": info.nbytes,
               **{f"tensors_{k}": v for k, v in sorted(info.counts().items())}, "fallback": len(info.fallback), **check}
        extra = {"tensors": info.tensors, "fallback": info.fallback, "dropped": info.dropped}
    else:
        info = export_compressed_tensors(q, out)
        check = _ct_check(q, out, zoo.tokenized_batches(st, texts[256:320], batch_size=64)[0])
        size = sum(p.stat().st_size for p in out.iterdir())
        row = {"model": model, "recipe": r.name, "format": fmt, "size_bytes": size, "quantized": len(info.quantized),
               "fallback": len(info.fallback), **check}
        extra = {"fallback": info.fallback, "dropped": info.dropped}
    return {"model": model, "recipe": r.name, "format": fmt, "out": str(out), "check": check, **extra,
            "seconds": {"quantize": t1 - t0, "export": time.perf_counter() - t1}, "results": [row]}
