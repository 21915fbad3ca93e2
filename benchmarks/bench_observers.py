"""Calibration speed and quality: lowbit observers beside ONNX Runtime's calibrators and torch's
HistogramObserver, on the same 16M activation values streamed in 64 batches.

    python benchmarks/bench_observers.py [--values 16777216] [--batches 64] [--threads 2]

Data: a heavy-tailed activation, ``[tokens, 1024]`` per batch, Laplace values times per-feature
scales drawn log-normally (a few features carry outliers, as in transformer activations).
Each method's range is turned into int8 (symmetric) scales and scored by SQNR on all values.

ONNX Runtime's calibrators are driven through their own collectors, as their
``collect_data`` does after running the model: ``HistogramCollector.collect`` once over the list
of all batches (ORT keeps every batch in memory until then), then ``compute_collection_result``
(entropy: 2048 bins, 128 quantized bins, its defaults for ``num_quantized_bins``; percentile:
2048 bins, symmetric). ORT's MinMax calibrator reduces each batch with ReduceMin/ReduceMax inside
the model and merges the ranges in Python; that part is timed with numpy min/max per batch.

Also: per-channel MSE (int8 and int4) on a 4096 x 4096 weight, ``ops.choose_qparams``; and per-group
MSE ranges (int4, group 128) of 4096 x 11008 and 11008 x 4096 weights (one MLP projection of a 7B
model), each in a fresh subprocess: wall time, process CPU time / threads (the wall time an idle
machine would show), and peak resident memory above the baseline with the weight loaded
(``ru_maxrss``), beside the weight's own size; and the quantization MSE of the grid search against
the former 2,048-bin histogram model on a 1024 x 4096 slice (the former method needs ~0.5 GB per
million weights, so it cannot run on the full weight on a 24 GB machine).

    python benchmarks/bench_observers.py --quick     # small sizes, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from lowbit import PerChannel, PerGroup, QuantSpec, ops
from lowbit.observers import MSE, Entropy, MaxAbs, MinMax, MovingAverage, Percentile


def make_batches(values: int, batches: int, features: int = 1024, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = values // batches // features
    scales = torch.exp(torch.randn(features, generator=g) * 0.6)
    out = []
    for _ in range(batches):
        u = torch.rand(tokens, features, generator=g) - 0.5
        out.append(-torch.sign(u) * torch.log1p(-2 * u.abs()) * scales)
    return out


REPEAT = 3  # best of 3 for every method, lowbit and peers alike (shared machines are noisy)


def timed(fn, repeat: int | None = None):
    repeat = repeat or REPEAT
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def sqnr(batches, spec, scale, zp) -> float:
    err = sig = 0.0
    for b in batches:
        e = ops.quant_error(b, spec, scale, zp)
        n = b.numel()
        err += e.mse * n
        sig += float(b.double().square().sum())
    return 10 * np.log10(sig / err)


def from_range(lo, hi, spec):
    return ops.range_to_qparams(torch.tensor([float(lo)]), torch.tensor([float(hi)]), spec)


def run_lowbit(cls, batches, spec, **kw):
    def go():
        obs = cls(spec, **kw)
        for b in batches:
            obs.update(b)
        return obs, obs.qparams()
    t, (obs, qp) = timed(go)
    return t, obs, qp


def ort_collector(method, batches, **kw):
    from onnxruntime.quantization.calibrate import HistogramCollector

    def go():
        c = HistogramCollector(method=method, **kw)
        with contextlib.redirect_stdout(io.StringIO()):
            c.collect({"x": [b.numpy() for b in batches]})
            return c.compute_collection_result()["x"]
    return timed(go)


def ort_minmax(batches):
    def go():
        lo, hi = np.inf, -np.inf
        for b in batches:
            a = b.numpy()
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
        return lo, hi
    return timed(go)


def torch_histogram(batches):
    from torch.ao.quantization import HistogramObserver

    def go():
        obs = HistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        for b in batches:
            obs(b)
        return obs.calculate_qparams()
    return timed(go)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mse_group_child(shape: str, threads: int) -> None:
    """Run in a fresh process: one per-group MSE ``choose_qparams``; print a JSON line."""
    torch.set_num_threads(threads)
    r, c = (int(v) for v in shape.split("x"))
    w = torch.randn(r, c, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(bits=4, granularity=PerGroup(128))
    ops.choose_qparams(w[:64], spec, observer="mse")     # warm up the kernels, not the memory
    base = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t, c0 = time.perf_counter(), time.process_time()
    s, z = ops.choose_qparams(w, spec, observer="mse")
    wall, cpu = time.perf_counter() - t, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # ru_maxrss is the lifetime peak: if it was reached before the call, the extra is overestimated
    print(json.dumps({"shape": shape, "wall_s": wall, "cpu_s": cpu, "threads": threads,
                      "extra_peak_bytes": max(peak, peak_before) - base, "weight_bytes": w.numel() * 4,
                      "sqnr_db": ops.quant_error(w, spec, s, z).sqnr_db}))


def old_histogram_mse(w: torch.Tensor, spec: QuantSpec):
    """The former one-shot MSE search (2,048-bin histogram per row, modelled error), for comparison."""
    from lowbit.ops.histogram import histogram_rows, row_minmax, span_exponent
    from lowbit.ops.ranges import mse_from_histogram
    rows = ops.to_rows(w, spec)
    lo, hi, finite = row_minmax(rows)
    e = span_exponent(torch.maximum(lo.abs(), hi.abs()))
    lo, hi = mse_from_histogram(histogram_rows(rows, e, 2048, finite), e, lo, hi, spec)
    s, z = ops.range_to_qparams(lo, hi, spec)
    return ops.from_rows(s, w.shape, spec), ops.from_rows(z, w.shape, spec)


def per_group_mse(threads: int, quick: bool) -> None:
    shapes = ["1024x4096"] if quick else ["4096x11008", "11008x4096"]
    print(f"\n{'per-group MSE int4 g128':34s} {'wall s':>8s} {'cpu/thr s':>9s} {'extra MB':>9s} {'weight MB':>9s} "
          f"{'extra/w':>7s}")
    for shape in shapes:
        out = subprocess.run([sys.executable, __file__, "--mse-child", shape, "--threads", str(threads)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{'lowbit MSE ' + shape:34s} {r['wall_s']:8.3f} {r['cpu_s'] / threads:9.3f} "
              f"{r['extra_peak_bytes'] / 2**20:9.1f} {r['weight_bytes'] / 2**20:9.1f} "
              f"{r['extra_peak_bytes'] / r['weight_bytes']:7.2f}")
    w = torch.randn(256 if quick else 1024, 4096, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec(bits=4, granularity=PerGroup(128))
    t_old, (s_old, z_old) = timed(lambda: old_histogram_mse(w, spec), 1)
    t_new, (s_new, z_new) = timed(lambda: ops.choose_qparams(w, spec, observer="mse"), 1)
    e_old, e_new = ops.quant_error(w, spec, s_old, z_old).mse, ops.quant_error(w, spec, s_new, z_new).mse
    print(f"{tuple(w.shape)} vs former 2048-bin histogram model: MSE new/old {e_new / e_old:.4f}, "
          f"time new/old {t_new / t_old:.2f} ({t_new:.2f} s vs {t_old:.2f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--values", type=int, default=1 << 24)
    ap.add_argument("--batches", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-torch", action="store_true", help="skip torch's HistogramObserver")
    ap.add_argument("--repeat", type=int, default=3, help="report the best of this many runs")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--mse-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mse_child:
        return mse_group_child(args.mse_child, args.threads)
    from _machine import header
    torch.set_num_threads(args.threads)
    print(header())
    if args.quick:
        args.values, args.batches, args.repeat = 1 << 20, 8, 1
    global REPEAT
    REPEAT = args.repeat
    torch.set_num_threads(args.threads)
    batches = make_batches(args.values, args.batches)
    n = sum(b.numel() for b in batches)
    spec = QuantSpec(bits=8)  # int8 symmetric, per tensor
    print(f"# {n / 1e6:.1f}M values in {len(batches)} batches, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    rows = []  # (name, seconds, sqnr, threshold)

    for name, cls, kw in [("lowbit MinMax", MinMax, {}), ("lowbit MaxAbs", MaxAbs, {}),
                          ("lowbit MovingAverage(0.01)", MovingAverage, {"momentum": 0.01}),
                          ("lowbit Percentile(99.999)", Percentile, {"p": 99.999}),
                          ("lowbit MSE", MSE, {}),
                          ("lowbit Entropy (Q=128)", Entropy, {"quantized_bins": 128, "variant": "onnxruntime"}),
                          ("lowbit Entropy (Q=255)", Entropy, {"variant": "onnxruntime"}),
                          ("lowbit Entropy (TensorRT)", Entropy, {})]:
        t, obs, (s, z) = run_lowbit(cls, batches, spec, **kw)
        rows.append((name, t, sqnr(batches, spec, s, z), float(obs.range()[1])))

    t, (lo, hi) = ort_minmax(batches)
    rows.append(("ORT MinMax (per-batch min/max)", t, sqnr(batches, spec, *from_range(lo, hi, spec)), hi))
    t, res = ort_collector("percentile", batches, symmetric=True, num_bins=2048, num_quantized_bins=128,
                           percentile=99.999, scenario="same")
    rows.append(("ORT Percentile(99.999)", t, sqnr(batches, spec, *from_range(res[0], res[1], spec)), float(res[1])))
    t, res = ort_collector("entropy", batches, symmetric=False, num_bins=2048, num_quantized_bins=128,
                           percentile=None, scenario="same")
    ort_entropy_t, ort_entropy_hi = t, float(res[1])
    rows.append(("ORT Entropy (Q=128)", t, sqnr(batches, spec, *from_range(res[0], res[1], spec)), float(res[1])))
    if not args.skip_torch:
        t, (s, z) = torch_histogram(batches)
        rows.append(("torch HistogramObserver", t, sqnr(batches, spec, s.reshape(()), z.reshape(()).int()),
                     float(s) * 127.5))

    print(f"\n{'method':34s} {'time s':>8s} {'SQNR dB':>8s} {'clip at':>9s}")
    for name, t, q, thr in rows:
        print(f"{name:34s} {t:8.3f} {q:8.2f} {thr:9.3f}")

    ours = next(r for r in rows if r[0] == "lowbit Entropy (Q=128)")
    bin_width = 2 * max(float(b.abs().max()) for b in batches) / 2048
    print(f"\nEntropy: lowbit {ours[1]:.3f} s vs ORT {ort_entropy_t:.3f} s -> {ort_entropy_t / ours[1]:.1f}x faster; "
          f"thresholds {ours[3]:.4f} vs {ort_entropy_hi:.4f} ({abs(ours[3] - ort_entropy_hi) / bin_width:.1f} ORT bins apart)")
    one_shot_t, (lo, hi) = timed(lambda: ops.RANGE_METHODS["entropy"](torch.cat(batches).reshape(1, -1), spec,
                                                                      quantized_bins=128, variant="onnxruntime"))
    print(f"Entropy one-shot (ops.choose_qparams on the concatenation): {one_shot_t:.3f} s, threshold "
          f"{float(hi):.4f} ({abs(float(hi) - ort_entropy_hi) / bin_width:.1f} ORT bins from ORT's)")

    per_group_mse(args.threads, args.quick)
    side = 1024 if args.quick else 4096
    w = torch.randn(side, side, generator=torch.Generator().manual_seed(1))
    print(f"\n{'per-channel weight ' + str(side) + 'x' + str(side):34s} {'time s':>8s} {'SQNR dB':>8s} {'maxabs dB':>9s}")
    for bits in (8, 4):
        wspec = QuantSpec(bits=bits, granularity=PerChannel(0))
        t, (s, z) = timed(lambda: ops.choose_qparams(w, wspec, observer="mse"))
        s_max, z_max = ops.choose_qparams(w, wspec, observer="maxabs")
        print(f"{'lowbit MSE int' + str(bits):34s} {t:8.3f} {ops.quant_error(w, wspec, s, z).sqnr_db:8.2f} "
              f"{ops.quant_error(w, wspec, s_max, z_max).sqnr_db:9.2f}")


if __name__ == "__main__":
    main()
