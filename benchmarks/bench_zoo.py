"""The built-in models, measured: fresh training time and test accuracy, sizes, MiniLM encode time.

    python benchmarks/bench_zoo.py [--json] [--skip-minilm] [--threads 2]

Each CNN is trained from scratch (the cache is neither read nor written) with its zoo recipe, and
reported beside the literature accuracy it must reach (MNIST-1D paper: ~94% for a small CNN;
small CNNs on digits: ~98%). Wall and CPU seconds are both printed: wall time depends on what else
runs on the machine, CPU time much less. MiniLM: the float all-MiniLM-L6-v2 encoding the built-in
512 sentences on ``--threads`` threads (best of 3).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from lowbit import zoo

LITERATURE = {"digits": 0.98, "mnist1d": 0.94}


def bench_cnn(name: str) -> dict:
    data = zoo.dataset_of(name)
    model = zoo.build_model(name)
    cfg = zoo.recipe(name)
    t0, c0 = time.perf_counter(), time.process_time()
    zoo.train(model, data, cfg, eval_test=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    acc = zoo.evaluate(model, data.x_test, data.y_test)
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "params": params, "param_bytes": 4 * params,
            "state_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
            "epochs": cfg.epochs, "threads": cfg.threads, "train_wall_s": round(wall, 2), "train_cpu_s": round(cpu, 2),
            "test_accuracy": round(acc, 4), "literature": LITERATURE[name], "meets": acc >= LITERATURE[name]}


def bench_minilm(threads: int) -> dict:
    model = zoo.load_minilm()
    texts = zoo.sentences()
    c0 = time.process_time()
    _, seconds = zoo.time_encode(model, texts, repeats=3, threads=threads)
    params = sum(p.numel() for p in model.parameters())
    return {"model": "minilm", "sentences": len(texts), "threads": threads, "encode_s": round(seconds, 3),
            "sentences_per_s": round(len(texts) / seconds, 1), "params": params, "param_bytes": 4 * params,
            "cpu_s_all_repeats": round(time.process_time() - c0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="threads for the MiniLM encode (default 2)")
    args = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out = {"torch": torch.__version__, "load_avg_1min": round(load, 2),
           "cnn": [bench_cnn(n) for n in zoo.MODELS]}
    if not args.skip_minilm:
        out["minilm"] = bench_minilm(args.threads)
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return
    print(f"torch {out['torch']}, 1-min load average {out['load_avg_1min']}")
    print(f"{'model':8} {'params':>7} {'bytes':>7} {'epochs':>6} {'wall s':>7} {'cpu s':>6} {'test acc':>8} {'literature':>10}")
    for r in out["cnn"]:
        print(f"{r['model']:8} {r['params']:7d} {r['param_bytes']:7d} {r['epochs']:6d} {r['train_wall_s']:7.2f} "
              f"{r['train_cpu_s']:6.2f} {r['test_accuracy']:8.4f} {r['literature']:10.2f}")
    if "minilm" in out:
        m = out["minilm"]
        print(f"minilm float: {m['sentences']} sentences in {m['encode_s']:.3f} s on {m['threads']} threads "
              f"({m['sentences_per_s']} sentences/s), {m['params']} params, {m['param_bytes']} bytes")


if __name__ == "__main__":
    main()
