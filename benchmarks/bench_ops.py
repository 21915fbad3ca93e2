"""lowbit.ops against PyTorch's own quantization ops and a plain memory copy, in one run.

    python benchmarks/bench_ops.py [--numel 67108864] [--threads 2] [--rounds 9] [--json]

Every candidate processes the same float32 tensor (64M elements by default). Reported bandwidth
is the float32 tensor's size divided by the time (``numel * 4 B / t``), so ratios are time
ratios. Candidates run round-robin (after warm-up calls, which include lowbit's one-time compile)
and each reports the median and the minimum of its rounds; ratios are given for both (on a
shared machine the minimum is the least disturbed run).

* copy: ``y.copy_(x)`` into a preallocated tensor (reads 4 B, writes 4 B per element);
* torch.quantize_per_tensor (qint8) and torch.fake_quantize_per_tensor_affine forward+backward
  (its backward is the clipped STE);
* lowbit quantize (int8, per tensor), dequantize, fake_quantize forward+backward with the clipped
  STE (the same semantics as torch's) and with the identity STE; the same with
  ``LOWBIT_COMPILE=0`` (the eager fallback) for reference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from lowbit import QuantSpec, ops  # noqa: E402


def _candidates(x: torch.Tensor, scale: float, zp: int):
    spec = QuantSpec(bits=8)
    s, z = torch.tensor(scale), torch.tensor(zp, dtype=torch.int32)
    y = torch.empty_like(x)
    g = torch.ones_like(x)
    q = ops.quantize(x, spec, s, z)
    xr = x.detach().requires_grad_(True)

    def torch_fq():
        out = torch.fake_quantize_per_tensor_affine(xr, scale, zp, -128, 127)
        return torch.autograd.grad(out, xr, g)

    def lowbit_fq(ste):
        def run():
            out = ops.fake_quantize(xr, spec, s, z, ste=ste)
            return torch.autograd.grad(out, xr, g)
        return run

    return {
        "copy (y.copy_(x))": (None, lambda: y.copy_(x)),
        "torch.quantize_per_tensor": (None, lambda: torch.quantize_per_tensor(x, scale, zp, torch.qint8)),
        "torch fake_quantize fwd+bwd": (None, torch_fq),
        "lowbit quantize": ("1", lambda: ops.quantize(x, spec, s, z)),
        "lowbit dequantize": ("1", lambda: ops.dequantize(q, spec, s, z)),
        "lowbit fake_quantize fwd+bwd (clipped STE)": ("1", lowbit_fq("clipped")),
        "lowbit fake_quantize fwd+bwd (identity STE)": ("1", lowbit_fq("identity")),
        "lowbit quantize, eager": ("0", lambda: ops.quantize(x, spec, s, z)),
        "lowbit dequantize, eager": ("0", lambda: ops.dequantize(q, spec, s, z)),
        "lowbit fake_quantize fwd+bwd (clipped), eager": ("0", lowbit_fq("clipped")),
    }


def run(numel: int, threads: int, rounds: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")  # torch.quantize_per_tensor's deprecation notice
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    scale = float(x.abs().max()) / 127
    cands = _candidates(x, scale, 0)
    times: dict[str, list[float]] = {name: [] for name in cands}

    def call(name):
        compile_flag, fn = cands[name]
        if compile_flag is not None:
            os.environ["LOWBIT_COMPILE"] = compile_flag
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    compile_s = {}
    for name in cands:
        t0 = time.perf_counter()
        for _ in range(warmup):
            call(name)
        compile_s[name] = time.perf_counter() - t0
    for _ in range(rounds):
        for name in cands:
            times[name].append(call(name))
    os.environ.pop("LOWBIT_COMPILE", None)
    gbytes = numel * 4 / 1e9
    rows = {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
                   "gb_per_s": gbytes / statistics.median(t), "warmup_s": compile_s[name]}
            for name, t in times.items()}
    pairs = {
        "lowbit quantize vs torch.quantize_per_tensor": ("torch.quantize_per_tensor", "lowbit quantize"),
        "lowbit quantize vs copy": ("copy (y.copy_(x))", "lowbit quantize"),
        "lowbit fake_quantize (clipped) vs torch fake_quantize": ("torch fake_quantize fwd+bwd", "lowbit fake_quantize fwd+bwd (clipped STE)"),
        "lowbit fake_quantize (identity) vs torch fake_quantize": ("torch fake_quantize fwd+bwd", "lowbit fake_quantize fwd+bwd (identity STE)"),
    }
    ratios = {name: {"median": statistics.median(times[a]) / statistics.median(times[b]),
                     "min": min(times[a]) / min(times[b])} for name, (a, b) in pairs.items()}
    return {"numel": numel, "threads": threads, "rounds": rounds, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "results": rows, "ratios": ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=64 * 1024 * 1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = run(args.numel, args.threads, args.rounds, args.warmup)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{args.numel:,} float32 elements, {args.threads} threads, torch {res['torch']}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'':48s} {'median ms':>10s} {'min ms':>8s} {'GB/s':>7s}")
    for name, r in res["results"].items():
        print(f"{name:48s} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {r['gb_per_s']:7.2f}")
    print(f"\n{'speed-up (time of the first / time of lowbit)':56s} {'median':>7s} {'min':>7s}")
    for name, v in res["ratios"].items():
        print(f"{name:56s} {v['median']:6.2f}x {v['min']:6.2f}x")


if __name__ == "__main__":
    main()
