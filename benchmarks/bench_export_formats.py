"""all-MiniLM-L6-v2 shipped to llama.cpp: lowbit's GGUF files beside llama.cpp's own quantization of
the same F16 file, in one run, on the same sentences.

    python benchmarks/bench_export_formats.py [--sentences 512] [--calibration 128] [--threads 2] [--quick] [--json]

Rows (mean / min per-sentence cosine of the sentence embedding to float sentence-transformers):

* ``F16 (lowbit export)``: the float model written by ``lb.export_gguf`` (checks the conversion);
* ``lowbit gguf-q8_0`` / ``gguf-q4_0`` / ``gguf-q4_k``: the recipes (Q4: AWQ folded into the layer
  norms, MSE ranges, GPTQ on GGUF-representable scales), exported by ``lb.export_gguf``;
  ``lowbit q4_0 RTN``: the Q4_0 grid with plain rounding (an ablation);
* ``llama.cpp Q8_0 / Q4_0 / Q4_K_M``: ``llama_model_quantize`` of the F16 file (its own quantizer;
  token embeddings kept F16 as lowbit keeps them, so the same tensors are quantized).

Each GGUF row is run twice: by llama.cpp (``llama-cpp-python``, the ``llama`` extra; its CPU kernels
also quantize activations to 8 bits) and by torch on the dequantized GGUF weights (what the file
holds, read with the ``gguf`` package). Without llama-cpp-python the llama.cpp column and the
llama.cpp-quantized rows are skipped with the reason. MiniLM's hidden size 384 is not a multiple of
256: Q4_K rows of 384 fall back (lowbit: Q4_0; llama.cpp: its own fallback type), see ``bpw``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

import lowbit as lb
from lowbit import zoo
from lowbit.export.gguf import _name_map
from lowbit.transformer.minilm import split_sentences
from lowbit.transformer.sentence import with_transformer

TARGETS = {"q8_0_cosine": 0.999}


def cpu_header(threads: int) -> str:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU: {model} | torch capability {torch.backends.cpu.get_cpu_capability()} | threads {threads} | "
            f"load average {load:.1f} (machine shared with other work)")


def cosines(emb: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    r = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    c = (e * r).sum(1)
    return float(c.mean()), float(c.min())


def llama_cpp_embed(path: str, texts: list[str], threads: int) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(path, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=threads,
                          verbose=False)
    try:
        return np.asarray([llm.embed(t) for t in texts], dtype=np.float64)
    finally:
        llm.close()


def llama_cpp_quantize(src: str, dst: str, ftype: int, threads: int) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = ftype, threads
    p.token_embedding_type = 1          # GGML_TYPE_F16: keep the token table float, as lowbit's recipes do
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def gguf_into_torch(path: str, bert: torch.nn.Module) -> torch.nn.Module:
    """A copy of the float ``bert`` whose 2-D weights are the GGUF file's, dequantized (gguf package)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    out = copy.deepcopy(bert)
    to_gguf = _name_map("bert", out.config)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            g = to_gguf(name)
            if g is None or g not in tensors:
                continue
            t = tensors[g]
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(p.shape))
            p.copy_(torch.from_numpy(np.array(w, dtype=np.float32)).to(p.dtype))
    return out


def bpw(path: str, n_weights: int) -> float:
    return 8.0 * os.path.getsize(path) / n_weights


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="64 sentences, 32 calibration sentences")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.sentences, args.calibration = 64, 32
    torch.set_num_threads(args.threads)
    log = sys.stderr
    print(cpu_header(args.threads), file=log, flush=True)
    try:
        import llama_cpp  # noqa: F401
        llama_reason = None
    except ImportError as e:
        llama_reason = f"llama-cpp-python is not installed ({e}); pip install 'lowbit[llama]' (builds llama.cpp)"
        print(f"SKIP llama.cpp rows: {llama_reason}", file=log)
    calib, texts = split_sentences(None, calibration_size=args.calibration)
    texts = texts[:args.sentences]
    st = zoo.load_minilm()
    bert = zoo.transformer_of(st)
    ref = zoo.encode(st, texts).double().numpy()
    batches = zoo.tokenized_batches(st, calib, batch_size=16)
    n_weights = sum(p.numel() for n, p in bert.named_parameters() if not n.startswith("pooler"))
    tmp = tempfile.mkdtemp(prefix="lowbit-gguf-")
    rows = []

    def row(name: str, path: str, q=None, seconds: float | None = None, note: str = "") -> None:
        r = {"name": name, "bpw": bpw(path, n_weights), "note": note}
        if seconds is not None:
            r["quantize_seconds"] = seconds
        emb_t = zoo.encode(with_transformer(st, gguf_into_torch(path, bert)), texts).double().numpy()
        r["torch_mean_cos"], r["torch_min_cos"] = cosines(emb_t, ref)
        if q is not None:   # lowbit's own frozen model: what the file must reproduce
            r["lowbit_mean_cos"], _ = cosines(zoo.encode(with_transformer(st, q), texts).double().numpy(), ref)
        if llama_reason is None:
            t0 = time.perf_counter()
            r["llama_cpp_mean_cos"], r["llama_cpp_min_cos"] = cosines(llama_cpp_embed(path, texts, args.threads), ref)
            r["llama_cpp_seconds"] = time.perf_counter() - t0
        rows.append(r)
        print(json.dumps(r), file=log, flush=True)

    f16 = os.path.join(tmp, "f16.gguf")
    lb.export_gguf(bert, f16, tokenizer=st.tokenizer)
    row("F16 (lowbit export)", f16)
    for recipe in ("gguf-q8_0", "gguf-q4_0", "gguf-q4_k"):
        t0 = time.perf_counter()
        q = lb.recipes.get(recipe).apply(bert, batches)
        secs = time.perf_counter() - t0
        path = os.path.join(tmp, f"{recipe}.gguf")
        info = lb.export_gguf(q, path, tokenizer=st.tokenizer)
        row(f"lowbit {recipe}", path, q, secs, ", ".join(f"{k} x{v}" for k, v in sorted(info.counts().items())))
    q = lb.quantize(bert, weights=lb.QuantSpec(bits=4, granularity=lb.PerGroup(32)))
    lb.transforms.gguf_grid(q, "q4_0")
    q = lb.freeze(q)
    path = os.path.join(tmp, "rtn-q4_0.gguf")
    lb.export_gguf(q, path, tokenizer=st.tokenizer)
    row("lowbit q4_0 RTN", path, q)
    if llama_reason is None:
        import llama_cpp

        for name, ftype in (("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
                            ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
            path = os.path.join(tmp, f"llama-{name}.gguf")
            t0 = time.perf_counter()
            llama_cpp_quantize(f16, path, ftype, args.threads)
            import gguf

            counts = {}
            for t in gguf.GGUFReader(path).tensors:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
            row(f"llama.cpp {name}", path, None, time.perf_counter() - t0,
                ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    by = {r["name"]: r for r in rows}
    key = "llama_cpp_mean_cos" if llama_reason is None else "torch_mean_cos"
    checks = {"q8_0_cosine": (by["lowbit gguf-q8_0"][key], TARGETS["q8_0_cosine"])}
    if llama_reason is None:
        for ours, theirs in (("lowbit gguf-q4_0", "llama.cpp Q4_0"), ("lowbit gguf-q4_k", "llama.cpp Q4_K_M")):
            checks[f"{ours} > {theirs}"] = (by[ours][key], by[theirs][key])
    result = {"header": cpu_header(args.threads), "sentences": len(texts), "calibration": len(calib),
              "measured_with": key, "llama_cpp_skipped": llama_reason, "rows": rows,
              "checks": {k: {"value": v, "versus": w, "pass": v >= w if "cosine" in k else v > w}
                         for k, (v, w) in checks.items()}}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(result["header"])
    print(f"{len(texts)} sentences, {len(calib)} calibration sentences; cosine to float sentence-transformers\n")
    print("| row | bpw | llama.cpp mean (min) cos | torch on GGUF weights mean cos | lowbit model mean cos | "
          "1 - cos ratio vs llama.cpp same type | tensors |")
    print("|---|---|---|---|---|---|---|")
    peer = {"lowbit gguf-q8_0": "llama.cpp Q8_0", "lowbit gguf-q4_0": "llama.cpp Q4_0",
            "lowbit q4_0 RTN": "llama.cpp Q4_0", "lowbit gguf-q4_k": "llama.cpp Q4_K_M"}
    for r in rows:
        lc = f"{r['llama_cpp_mean_cos']:.5f} ({r['llama_cpp_min_cos']:.4f})" if "llama_cpp_mean_cos" in r else "skipped"
        lw = f"{r['lowbit_mean_cos']:.5f}" if "lowbit_mean_cos" in r else ""
        ratio = ""
        p = by.get(peer.get(r["name"], ""))
        if p is not None and key in p:
            ratio = f"{(1 - r[key]) / max(1 - p[key], 1e-12):.2f}x"
        print(f"| {r['name']} | {r['bpw']:.2f} | {lc} | {r['torch_mean_cos']:.5f} | {lw} | {ratio} | {r['note']} |")
    print()
    for k, c in result["checks"].items():
        print(f"{'PASS' if c['pass'] else 'FAIL'} {k}: {c['value']:.5f} vs {c['versus']:.5f}")
    if llama_reason:
        print(f"llama.cpp not run: {llama_reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
