"""Integer execution: which exact GEMM is fastest on this CPU, how the integer path agrees with
the fake-quantized model on real data (scikit-learn digits, a small CNN trained here in seconds),
and how fast the built-in CNNs run quantized, beside torch's own int8.

    python benchmarks/bench_integer.py [--quick] [--threads 1]

The speed table runs the ``lowbit.zoo`` CNNs on their whole test split with ``--threads`` threads:
float torch; torch int8 (``torch.ao`` FX ``prepare_fx``/``convert_fx``, x86 qconfig, fbgemm kernels);
lowbit ``w8a8`` frozen (fake-quantized torch, the reference) and ``lowbit.integer.fast`` (ONNX
Runtime: QLinearConv / MatMulInteger). Candidates run round-robin after warm-up; median of the rounds.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import lowbit as lb
from lowbit.integer import to_integer
from lowbit.ops.integer_math import int_matmul


def bench(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def gemm_table(reps):
    print("## Exact integer GEMM backends (ms, best of %d; 'exact' = equals the int64 product)" % reps)
    print("| M x K x N | float32 (peer, inexact) | int64 matmul | int32 matmul | torch._int_mm int8 | lowbit int_matmul |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(64, 512, 512), (256, 512, 512), (1024, 1024, 1024)]:
        a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
        ref = a.long() @ b.long()
        af, bf, a32, b32, a64, b64 = a.float(), b.float(), a.int(), b.int(), a.long(), b.long()
        cols = []
        for fn, out in [(lambda: af @ bf, None), (lambda: a64 @ b64, None), (lambda: a32 @ b32, None),
                        (lambda: torch._int_mm(a, b), None), (lambda: int_matmul(a, b), None)]:
            ms = bench(fn, reps)
            exact = torch.equal(fn().long(), ref) if fn().dtype != torch.float32 else bool((fn() == ref.float()).all())
            cols.append(f"{ms:.2f}{'' if exact else ' (inexact)'}")
        print(f"| {m} x {k} x {n} | " + " | ".join(cols) + " |")
    print()


def digits_cnn(epochs):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(epochs):
        m.train()
        for i in range(0, len(tr), 64):
            idx = tr[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
    return m.eval(), x[tr], x[te], y[te]


def agreement_table(epochs, reps):
    m, xtr, xte, yte = digits_cnn(epochs)
    with torch.no_grad():
        acc = lambda model: float((model(xte).argmax(1) == yte).float().mean()) * 100  # noqa: E731
        print(f"## Integer path vs fake quantization, digits CNN (test set {len(xte)} images); float accuracy {acc(m):.2f}%")
        print("| recipe | fake-quant acc | integer acc | same prediction | max |logit diff| / max |logit| "
              "| requantized links | float ms | fake-quant ms | integer ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        au8 = lb.QuantSpec(bits=8, signed=False, symmetric=False)
        for name, w, a in [("W8A8 per-channel", lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)), au8),
                           ("W4A8 per-channel", lb.QuantSpec(bits=4, granularity=lb.PerChannel(0)), au8),
                           ("W4A8 per-group 32", lb.QuantSpec(bits=4, granularity=lb.PerGroup(32)), au8),
                           ("W8A8 dynamic", lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)),
                            lb.QuantSpec(bits=8, signed=False, symmetric=False, dynamic=True))]:
            q = lb.quantize(m, weights=w, activations=a)
            with lb.calibrate(q):
                for i in range(0, len(xtr), 256):
                    q(xtr[i:i + 256])
            lb.freeze(q)
            qi = to_integer(q)
            yf, yi = q(xte), qi(xte)
            same = float((yf.argmax(1) == yi.argmax(1)).float().mean()) * 100
            rel = float((yf - yi).abs().max() / yf.abs().max())
            t_float, t_fake, t_int = (bench(lambda mod=mod: mod(xte), reps) for mod in (m, q, qi))
            print(f"| {name} | {acc(q):.2f}% | {acc(qi):.2f}% | {same:.2f}% | {rel:.4f} | "
                  f"{len(qi.lowbit_integer.requantized)} | {t_float:.1f} | {t_fake:.1f} | {t_int:.1f} |")


def speed_table(rounds: int, threads: int) -> None:
    import copy
    import statistics
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from lowbit import recipes, zoo
    from lowbit.integer import fast

    torch.set_num_threads(threads)
    print(f"## Built-in CNNs, whole test split, {threads} thread(s), ms per call (median of {rounds} round-robin rounds)")
    print("| model | float torch | torch int8 (FX, x86) | lowbit w8a8 frozen | lowbit w8a8 fast (ORT) "
          "| float / torch int8 | float / lowbit fast | same top-1, fast vs frozen |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("digits", "mnist1d"):
        model, data = zoo.get(name)
        x, calib = data.x_test, zoo.calibration_batches(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (calib[0],))
            with torch.no_grad():
                for b in calib:
                    prepared(b)
            torch_int8 = convert_fx(prepared)
        q = recipes.get("w8a8").apply(model, calib)
        fq = fast(q, example_inputs=x[:64], threads=threads)
        runs = {"float": model, "torch": torch_int8, "frozen": q, "fast": fq}
        times: dict[str, list[float]] = {k: [] for k in runs}
        with torch.no_grad():
            for m in runs.values():
                for _ in range(5):
                    m(x)
            for _ in range(rounds):
                for k, m in runs.items():
                    t = time.perf_counter()
                    m(x)
                    times[k].append((time.perf_counter() - t) * 1e3)
            same = float((fq(x).argmax(1) == q(x).argmax(1)).double().mean()) * 100
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {name} ({len(x)} inputs) | {med['float']:.2f} | {med['torch']:.2f} | {med['frozen']:.2f} | "
              f"{med['fast']:.2f} | {med['float'] / med['torch']:.2f}x | {med['float'] / med['fast']:.2f}x | {same:.1f}% |")
    print()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(2)
    reps = 3 if args.quick else 10
    gemm_table(reps)
    agreement_table(4 if args.quick else 12, reps)
    speed_table(5 if args.quick else 21, args.threads)
