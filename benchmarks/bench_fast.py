"""Fast execution of quantized MiniLM on CPU: lowbit's paths beside float and the peers' int8.

Encodes the built-in 512 sentences with all-MiniLM-L6-v2 (zoo.encode, batch 64) on 2 threads,
swapping only the transformer inside the SentenceTransformer; reports the median wall and CPU
time of ``--repeats`` encodes, the speed-up over float torch, and the mean cosine of the
embeddings to float torch's. Paths run round-robin (one encode each per round), so a change
of machine load affects all of them alike; the slow frozen (fake-quantized) paths run once:

    float torch | float ONNX Runtime | torch quantize_dynamic (fbgemm) | ONNX Runtime quantize_dynamic
    lowbit W8A8 (int8 per-channel weights, int8 dynamic per-token activations):
        frozen (fake-quantized torch) | fast torch (_int_mm) | ONNX Runtime QDQ | fast ort (MatMulInteger)
    lowbit W4 g128 weight-only: frozen | fast torch (dequantized once) | ORT MatMulNBits (exact / accuracy 4)

The header names the CPU (model, ``torch.backends.cpu.get_cpu_capability()``, its int8 class: does
ONNX Runtime's u8 x s8 GEMM saturate here, see ``lowbit.integer.cpu``), the threads and the
versions. Each lowbit W8A8 row is also given as a ratio to the best peer int8 path (torch or ONNX
Runtime ``quantize_dynamic``) of the same run; the fast ort path runs in the int8 format lowbit
picks for this CPU, and (full run) in both forced formats, u8s8 and u8u8 (exact on every CPU).

    python benchmarks/bench_fast.py [--repeats 3] [--threads 2] [--sentences 512] [--quick] [--json]

``--quick``: 128 sentences, one repeat, no slow or weight-only rows (a smoke run). ``--w8a8-only``:
full size, but only float, the peers and lowbit's W8A8 ONNX Runtime rows.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

import lowbit as lb
from lowbit import zoo
from lowbit.export import OrtModule, ort_module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="128 sentences, 1 repeat, W8A8 and peers only")
    ap.add_argument("--w8a8-only", action="store_true",
                    help="float, the peers and lowbit's W8A8 ONNX Runtime paths only (no slow or 4-bit rows)")
    args = ap.parse_args()
    if args.quick:
        args.sentences, args.repeats = min(args.sentences, 128), 1
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import onnxruntime

    info = lb.integer.cpu.cpu_info()
    ort_version = onnxruntime.__version__
    print(f"CPU: {info.describe()}", file=sys.stderr, flush=True)
    texts = zoo.sentences()[: args.sentences]
    st = zoo.load_minilm()
    bert = zoo.transformer_of(st)
    reference = zoo.encode(st, texts)
    example = zoo.tokenized_batches(st, texts[:8], batch_size=8)[0]
    rows: list[dict] = []
    paths: list[tuple[str, nn.Module, str, int]] = []     # (name, transformer, note, repeats)

    def add(name: str, inner: nn.Module, note: str = "", repeats: int | None = None) -> None:
        paths.append((name, inner, note, args.repeats if repeats is None else repeats))

    def encode_with(inner: nn.Module) -> tuple[torch.Tensor, float, float]:
        old = st[0].model
        st[0].model = inner
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            emb = zoo.encode(st, texts)
            return emb, time.perf_counter() - t0, time.process_time() - c0
        finally:
            st[0].model = old

    tmp = tempfile.mkdtemp(prefix="lowbit-bench-")
    add("float torch", bert)
    # float ONNX Runtime: the same exporter, no quantization
    import torch.utils._pytree as pytree

    float_path = os.path.join(tmp, "float.onnx")
    auto = torch.export.Dim.AUTO
    torch.onnx.export(bert, (), kwargs=example, dynamo=True, verbose=False, opset_version=21,
                      dynamic_shapes={k: {0: auto, 1: auto} for k in example},
                      output_names=["last_hidden_state", "pooler_output"]).save(float_path)
    with torch.no_grad():
        _, spec = pytree.tree_flatten(bert(**example))
    add("float ONNX Runtime", OrtModule(float_path, spec, args.threads, config=bert.config))
    # peers
    qd = torch.ao.quantization.quantize_dynamic(copy.deepcopy(bert), {nn.Linear}, dtype=torch.qint8)
    add("torch quantize_dynamic int8 (fbgemm)", qd, "peer: per-tensor activations")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ort_dyn = os.path.join(tmp, "ort_dynamic.onnx")
    quantize_dynamic(float_path, ort_dyn, weight_type=QuantType.QInt8)
    add("ONNX Runtime quantize_dynamic int8", OrtModule(ort_dyn, spec, args.threads, config=bert.config),
        "peer: per-tensor activations")
    # lowbit W8A8: int8 per-channel weights, int8 dynamic per-token activations
    w8a8 = lb.freeze(lb.quantize(bert, weights=lb.QuantSpec(8, granularity=lb.PerChannel(0)),
                                 activations=lb.QuantSpec(8, dynamic=True, granularity=lb.PerToken())))
    ort_fast = lb.integer.fast(w8a8, backend="ort", example_inputs=example, threads=args.threads)
    chosen = lb.integer.cpu.check_format(None) or ("u8s8" if lb.integer.cpu.u8s8_exact_here() else "u8u8")
    add(f"lowbit W8A8 fast ort ({chosen}, chosen)", ort_fast, "MatMulIntegerToFloat, per-token")
    if not args.quick:
        for forced in lb.integer.cpu.FORMATS:
            add(f"lowbit W8A8 fast ort ({forced}, forced)", lb.integer.fast(
                w8a8, backend="ort", example_inputs=example, threads=args.threads, int8_format=forced),
                "exact on every CPU" if forced == "u8u8" else "exact with VNNI/AMX")
    if not (args.quick or args.w8a8_only):
        add("lowbit W8A8 ONNX Runtime QDQ", ort_module(w8a8, example, threads=args.threads), "export_onnx graph")
    if not args.w8a8_only:
        add("lowbit W8A8 fast torch (_int_mm)", lb.integer.fast(w8a8, backend="torch"))
    if not (args.quick or args.w8a8_only):
        add("lowbit W8A8 frozen (torch, fake-quant)", w8a8, "one run", 1)
        # lowbit W4 g128 weight-only
        w4 = lb.freeze(lb.quantize(bert, weights=lb.QuantSpec(4, granularity=lb.PerGroup(128))))
        w4_path = os.path.join(tmp, "w4.onnx")
        lb.export.export_onnx(w4, example, w4_path)
        add("lowbit W4g128 ORT MatMulNBits (exact)", OrtModule(w4_path, spec, args.threads, True, bert.config),
            "accuracy_level 1")
        add("lowbit W4g128 ORT MatMulNBits (accuracy 4)", OrtModule(w4_path, spec, args.threads, False, bert.config),
            "int8 activations per block of 32")
        add("lowbit W4g128 fast torch (dequantized once)", lb.integer.fast(w4, backend="torch"))
        add("lowbit W4g128 frozen (torch)", w4, "one run; unpacks weights each call", 1)

    # round robin: every path runs once per round, so a change of machine load hits all alike
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in paths}
    embs: dict[str, torch.Tensor] = {}
    for name, inner, _, _ in paths:                          # warm-up: allocators, kernels, sessions
        old = st[0].model
        st[0].model = inner
        try:
            zoo.encode(st, texts[:64])
        finally:
            st[0].model = old
    for r in range(args.repeats):
        for name, inner, _, reps in paths:
            if r >= reps:
                continue
            emb, wall, cpu = encode_with(inner)
            times[name].append((wall, cpu))
            embs[name] = emb
            print(f"round {r}: {name:44s} wall {wall:6.2f}s cpu {cpu:6.2f}s", file=sys.stderr, flush=True)
    for name, _, note, _ in paths:
        cos = torch.nn.functional.cosine_similarity(embs[name], reference).mean().item()
        rows.append({"path": name, "wall_s": statistics.median(t[0] for t in times[name]),
                     "cpu_s": statistics.median(t[1] for t in times[name]), "cosine_mean": cos, "note": note,
                     "runs": len(times[name])})
    base = rows[0]["wall_s"]
    base_cpu = rows[0]["cpu_s"]
    peers = [r for r in rows if r["note"].startswith("peer")]
    best_peer = min(peers, key=lambda r: r["wall_s"])
    for r in rows:
        r["speedup_wall"] = base / r["wall_s"]
        r["speedup_cpu"] = base_cpu / r["cpu_s"]
        r["vs_best_peer"] = best_peer["wall_s"] / r["wall_s"]
    lowbit_row = next(r for r in rows if r["path"].startswith("lowbit W8A8 fast ort") and "chosen" in r["path"])
    target = {"lowbit_path": lowbit_row["path"], "best_peer": best_peer["path"],
              "ratio_vs_best_peer": lowbit_row["vs_best_peer"], "cosine": lowbit_row["cosine_mean"],
              "met": lowbit_row["vs_best_peer"] >= 1.0 and lowbit_row["cosine_mean"] >= 0.995}
    header = {"cpu": info.describe(), "cpu_model": info.model, "torch_cpu_capability": info.torch_capability,
              "int8_class": info.int8_class, "u8s8_exact_here": lb.integer.cpu.u8s8_exact_here(),
              "chosen_int8_format": chosen, "threads": args.threads, "torch": torch.__version__,
              "onnxruntime": ort_version}
    if args.json:
        json.dump({"header": header, "sentences": len(texts), "threads": args.threads, "repeats": args.repeats,
                   "rows": rows, "target": target}, sys.stdout, indent=2)
        print()
        return
    print(f"CPU: {info.describe()}")
    print(f"torch {torch.__version__}, onnxruntime {ort_version}; ONNX Runtime int8 format chosen here: {chosen}")
    print(f"MiniLM encode of {len(texts)} sentences, {args.threads} threads, median of {args.repeats}")
    print(f"{'path':44s} {'wall s':>7s} {'cpu s':>7s} {'x float':>7s} {'x cpu':>7s} {'x peer':>7s} {'cosine':>8s}  note")
    for r in rows:
        print(f"{r['path']:44s} {r['wall_s']:7.2f} {r['cpu_s']:7.2f} {r['speedup_wall']:7.2f} {r['speedup_cpu']:7.2f} "
              f"{r['vs_best_peer']:7.2f} {r['cosine_mean']:8.5f}  {r['note']}")
    print(f"x peer = best peer's wall time / this path's ({best_peer['path']}). Target: {target['lowbit_path']} "
          f"{target['ratio_vs_best_peer']:.2f}x the best peer at cosine {target['cosine']:.5f} -> "
          f"{'met' if target['met'] else 'NOT met'} (>= 1.00x at >= 0.995)")


if __name__ == "__main__":
    main()
