"""4-bit weights (groups of 128) on all-MiniLM-L6-v2: round to nearest, AWQ, GPTQ and AWQ + GPTQ, by calibration size.

    python benchmarks/bench_awq.py [--calibration 128,256,512] [--methods rtn,awq,gptq,awq+gptq] [--threads 2] [--json]

Every nn.Linear of the transformer gets asymmetric 4-bit weights in groups of 128 (activations
float), as the ``w4g128`` recipes do. Methods:

* ``rtn``: round to nearest on min/max group ranges;
* ``awq``: ``lb.transforms.awq`` (Lin et al. 2024: per-input-channel scales searched per layer on the
  calibration output error), then round to nearest;
* ``gptq``: ``lb.gptq`` with ``act_order`` (Frantar et al. 2022);
* ``awq+gptq``: AWQ's scales, then GPTQ on the scaled weights.

Calibration: the first N built-in sentences not among the 512 evaluated ones, tokenized without
padding (``lowbit.transformer.calibration_batches``). Columns: mean / min cosine of each sentence
embedding to the float model's, Spearman of pairwise similarities, quantization wall and CPU
seconds (calibration forwards included), on ``--threads`` threads.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import lowbit as lb
from lowbit import zoo
from lowbit.transformer import calibration_batches, minilm, with_transformer

W4 = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerGroup(128))
METHODS = ("rtn", "awq", "gptq", "awq+gptq")


def quantize(inner, method: str, batches) -> torch.nn.Module:
    base = lb.transforms.awq(inner, batches, W4) if method.startswith("awq") else inner
    q = lb.quantize(base, weights=W4)
    if method.endswith("gptq"):
        lb.gptq(q, batches, act_order=True)
    return lb.freeze(q)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", default="128,256,512")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = [int(n) for n in args.calibration.split(",") if n]
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS}")
    torch.set_num_threads(args.threads)
    st = zoo.load_minilm()
    inner = zoo.transformer_of(st)
    texts = zoo.sentences()
    ref = zoo.encode(st, texts)
    rows = []
    for n in sizes:
        calib, _ = minilm.split_sentences(texts, "builtin", n)
        batches = calibration_batches(st, calib)
        for method in methods:
            if method == "rtn" and n != sizes[0]:
                continue                       # data-free: one row
            t0, c0 = time.perf_counter(), time.process_time()
            q = quantize(inner, method, batches)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            a = zoo.compare_embeddings(ref, zoo.encode(with_transformer(st, q), texts))
            row = {"method": method, "calibration": 0 if method == "rtn" else len(calib), "cosine_mean": a.cosine_mean,
                   "cosine_min": a.cosine_min, "spearman": a.spearman, "seconds": wall, "cpu_seconds": cpu}
            rows.append(row)
            print(f"  {method} {row['calibration']}: cos {a.cosine_mean:.5f} (min {a.cosine_min:.4f}) rho {a.spearman:.4f} "
                  f"{wall:.1f}s ({cpu:.1f} cpu)", file=sys.stderr, flush=True)
    if args.json:
        json.dump({"threads": args.threads, "sentences": len(texts), "rows": rows}, sys.stdout, indent=2)
        print()
        return
    print(f"all-MiniLM-L6-v2, 4-bit weights (asymmetric, groups of 128), {len(texts)} sentences scored, "
          f"{args.threads} threads, torch {torch.__version__}")
    print("| method | calibration sentences | mean cos | min cos | Spearman | quantize s (CPU s) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['calibration'] or '-'} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
              f"{r['spearman']:.4f} | {r['seconds']:.1f} ({r['cpu_seconds']:.1f}) |")


if __name__ == "__main__":
    main()
