"""QAT against PTQ on the built-in MNIST-1D CNN: accuracy of each surrogate, and the cost per epoch.

    python benchmarks/bench_qat.py [--epochs 5] [--seeds 2] [--json] [--markdown FILE]

Model and data: ``lowbit.zoo`` ``mnist1d`` (the trained float CNN, 4000 train / 1000 test).
Weights per output channel, symmetric; activations asymmetric 8-bit per tensor.

* **PTQ rows**: round-to-nearest with min/max ranges (RTN, the issue's baseline) and with
  MSE-optimal ranges, calibrated on 8 train batches of 64.
* **QAT rows** (``lowbit.train.run``, the ``lowbit train`` recipe): PTQ (MSE ranges) as the start,
  then ``--epochs`` epochs of AdamW, one-cycle lr peaking at 1e-3, batch 64, LSQ step sizes for
  weights and activations unless the row says otherwise; test accuracy of the frozen integer
  model. Rounding (nearest / stochastic) and surrogate (STE / uniform noise) side by side.
  Mean (and min..max) over ``--seeds`` seeds (the seed changes data order and random draws).
* **Float fine-tune**: the float model trained the same number of epochs with the same recipe,
  to show what extra training alone does.
* **Cost**: seconds per training epoch, float model vs. the W2A8 QAT model, measured in this
  process with the same thread count, alternating float / QAT runs and taking the median; CPU
  time (``time.process_time``) next to wall time, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time

import torch

import lowbit as lb
from lowbit import zoo
from lowbit.train import RunConfig, run

QAT_ROWS = [  # (label, weight bits, RunConfig overrides)
    ("LSQ, nearest, STE", 2, {}),
    ("LSQ, stochastic, STE", 2, {"rounding": "stochastic"}),
    ("LSQ, nearest, noise", 2, {"surrogate": "noise"}),
    ("LSQ, stochastic, noise", 2, {"rounding": "stochastic", "surrogate": "noise"}),
    ("fixed PTQ grids, nearest, STE", 2, {"learn_scales": False}),
    ("LSQ weights + PACT activations, clipped STE", 2, {"act_learning": "pact", "ste": "clipped"}),
    ("LSQ, nearest, STE", 3, {}),
    ("LSQ, stochastic, STE", 3, {"rounding": "stochastic"}),
    ("LSQ, nearest, noise", 3, {"surrogate": "noise"}),
]


def ptq_accuracy(model, data, bits: int, observer: str) -> float:
    q = lb.quantize(model, weights=lb.QuantSpec(bits=bits, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(bits=8, symmetric=False), observer=observer)
    with lb.calibrate(q):
        for b in zoo.calibration_batches(data):
            q(b)
    return zoo.evaluate(lb.freeze(q), data.x_test, data.y_test)


def timed_epochs(model, data, epochs: int) -> tuple[float, float]:
    """(wall, cpu) seconds per epoch of zoo.train on ``model`` (trained in place)."""
    w, c = time.perf_counter(), time.process_time()
    zoo.train(model, data, zoo.TrainConfig(epochs=epochs, lr=1e-3, weight_decay=0.0, threads=1), eval_test=False)
    return (time.perf_counter() - w) / epochs, (time.process_time() - c) / epochs


def epoch_cost(model, data, repeats: int = 3, epochs: int = 2) -> dict:
    floats, qats = [], []
    for _ in range(repeats):
        floats.append(timed_epochs(copy.deepcopy(model), data, epochs))
        q = lb.quantize(model, weights=lb.QuantSpec(bits=2, granularity=lb.PerChannel(0)),
                        activations=lb.QuantSpec(bits=8, symmetric=False), observer="mse")
        with lb.calibrate(q):
            for b in zoo.calibration_batches(data):
                q(b)
        lb.qat.prepare(q)
        qats.append(timed_epochs(q, data, epochs))
    fw, fc = statistics.median(f[0] for f in floats), statistics.median(f[1] for f in floats)
    qw, qc = statistics.median(q[0] for q in qats), statistics.median(q[1] for q in qats)
    return {"float_wall_s": fw, "float_cpu_s": fc, "qat_wall_s": qw, "qat_cpu_s": qc,
            "ratio_wall": qw / fw, "ratio_cpu": qc / fc}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}


def fmt(s: dict) -> str:
    if len(s["values"]) == 1:
        return f"{100 * s['mean']:.1f}"
    return f"{100 * s['mean']:.1f} ({100 * s['min']:.1f}..{100 * s['max']:.1f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    model, data = zoo.get("mnist1d")
    float_acc = zoo.evaluate(model, data.x_test, data.y_test)
    rows = [{"method": "float (zoo model)", "accuracy": summary([float_acc]), "vs_float": 0.0}]
    ft = []
    for seed in range(args.seeds):
        m = copy.deepcopy(model)
        zoo.train(m, data, zoo.TrainConfig(epochs=args.epochs, lr=1e-3, weight_decay=0.0, seed=seed), eval_test=False)
        ft.append(zoo.evaluate(m, data.x_test, data.y_test))
    rows.append({"method": f"float fine-tuned {args.epochs} epochs (same recipe)", "accuracy": summary(ft)})
    for bits in (2, 3):
        for observer, label in (("minmax", "RTN, min/max ranges"), ("mse", "RTN, MSE ranges")):
            rows.append({"method": f"W{bits}A8 PTQ {label}", "accuracy": summary([ptq_accuracy(model, data, bits, observer)])})
    for label, bits, overrides in QAT_ROWS:
        accs, secs = [], []
        for seed in range(args.seeds):
            cfg = RunConfig(model="mnist1d", weights=bits, activations=8, epochs=args.epochs, seed=seed, **overrides)
            with tempfile.TemporaryDirectory() as out:
                r = run(cfg, out, model=model, dataset=data)
            accs.append(r["quantized"]["accuracy"])
            secs += [e["seconds"] for e in r["epochs"]]
            print(f"  W{bits}A8 {label} seed {seed}: {100 * accs[-1]:.1f}%", file=sys.stderr)
        rows.append({"method": f"W{bits}A8 QAT: {label}", "accuracy": summary(accs),
                     "epoch_wall_s": statistics.median(secs)})
    for r in rows:
        r["vs_float"] = r["accuracy"]["mean"] - float_acc
    cost = epoch_cost(model, data)
    total = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    result = {"model": "mnist1d", "float_accuracy": float_acc, "epochs": args.epochs, "seeds": args.seeds,
              "rows": rows, "epoch_cost": cost, "total": total, "torch": torch.__version__, "threads": 1}
    md = [f"MNIST-1D CNN (zoo `mnist1d`, float {100 * float_acc:.1f}%), test accuracy (%) of the frozen integer "
          f"model, mean (min..max) over {args.seeds} seeds, {args.epochs} QAT epochs; "
          f"`python benchmarks/bench_qat.py --epochs {args.epochs} --seeds {args.seeds}`", "",
          "| method | accuracy % | vs float (points) |", "|---|---:|---:|"]
    md += [f"| {r['method']} | {fmt(r['accuracy'])} | {100 * r['vs_float']:+.1f} |" for r in rows]
    md += ["", "| seconds per training epoch (1 thread, median of 3) | wall | CPU |", "|---|---:|---:|",
           f"| float model | {cost['float_wall_s']:.2f} | {cost['float_cpu_s']:.2f} |",
           f"| W2A8 QAT (LSQ) | {cost['qat_wall_s']:.2f} | {cost['qat_cpu_s']:.2f} |",
           f"| ratio QAT / float | {cost['ratio_wall']:.2f}x | {cost['ratio_cpu']:.2f}x |", "",
           f"Whole benchmark: {total['wall_s']:.0f} s wall, {total['cpu_s']:.0f} s CPU."]
    table = "\n".join(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
