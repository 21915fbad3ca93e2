"""Where the peak resident memory of a streamed GPTQ run goes, phase by phase (issue 12).

Runs ``lb.quantize_checkpoint`` in this process with the library's phases tagged (shard reads,
each unit's processing, GPTQ's passes, each layer's solve and its inverse-Hessian factor, the shard
writes) and prints, per phase, the resident memory at its start and the peak reached inside it
(``ru_maxrss`` read at every phase boundary, so a short-lived spike is attributed exactly; a 2 ms
``/proc/self/statm`` sampler gives the current RSS).

    PYTHONPATH=src python benchmarks/profile_stream_rss.py [SRC_DIR] [--layers 2] [--recipe w4g128-gptq]
                                                           [--seqs 32] [--seq-len 256] [--threads 1]

``SRC_DIR`` is any Hugging Face Llama directory; without it, a random-init float32 checkpoint of
the 3B width (hidden 3200, MLP 8640, vocab 32000) with ``--layers`` layers is written to a
temporary directory (``bench_stream.write_checkpoint``) and deleted afterwards.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import _machine

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Phases:
    def __init__(self) -> None:
        self.stack: list[str] = ["setup"]
        self.rows: list[tuple[str, int, int, float]] = []   # (phase, rss at start, peak inside, seconds)
        self.sampled: dict[str, int] = {}
        self.stop = False
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.stop:
            r, stack = _rss(), list(self.stack)
            for k in range(1, len(stack) + 1):   # a phase's peak includes its inner phases'
                p = "/".join(stack[:k])
                if r > self.sampled.get(p, 0):
                    self.sampled[p] = r
            time.sleep(0.002)

    @contextlib.contextmanager
    def __call__(self, name: str):
        before, start, t0 = _maxrss(), _rss(), time.perf_counter()
        self.stack.append(name)
        path = "/".join(self.stack)
        try:
            yield
        finally:
            after = _maxrss()
            peak = after if after > before else self.sampled.get(path, start)
            self.rows.append((path, start, peak, time.perf_counter() - t0))
            print(f"{path[-70:]:<70} {start / 2**30:>10.2f} {peak / 2**30:>8.2f} {self.rows[-1][3]:>7.1f}", flush=True)
            self.stack.pop()


def wrap(module, attr: str, phases: Phases, label) -> None:
    fn = getattr(module, attr)

    def wrapped(*args, **kwargs):
        with phases(label(*args, **kwargs) if callable(label) else label):
            return fn(*args, **kwargs)

    setattr(module, attr, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", nargs="?", default=None)
    ap.add_argument("--layers", type=int, default=2, help="layers of the written checkpoint (no SRC_DIR)")
    ap.add_argument("--recipe", default="w4g128-gptq")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dst", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(_machine.header())
    import lowbit as lb
    from lowbit.gptq import driver, solver
    from lowbit.stream import output, runner, shards

    ph = Phases()
    wrap(shards.ShardReader, "read", ph, "read")
    wrap(runner, "process", ph, lambda shell, *a, **k: f"process[{type(shell).__name__}:{len(list(shell.parameters()))}]")
    wrap(output.Output, "write_unit", ph, lambda self, i, shell: f"write[{i}]")
    wrap(driver, "_quantize_layer", ph, lambda name, *a, **k: f"layer[{name}]")
    wrap(driver, "solve", ph, "solve")
    wrap(solver, "_factor", ph, "factor")
    wrap(driver, "output_error", ph, "output_error")
    print(f"{'phase (rows print as each phase ends)':<70} {'rss start':>10} {'peak':>8} {'s':>7}", flush=True)
    scratch = None
    if args.src is None:
        import bench_stream

        scratch = Path(tempfile.mkdtemp(prefix="rss_prof_src_"))
        args.src = str(scratch)
        bench_stream.write_checkpoint(bench_stream.llama_config(3e9, args.layers, False), scratch)
    cfg = json.loads((Path(args.src) / "config.json").read_text())
    calib = torch.randint(0, cfg["vocab_size"], (args.seqs, args.seq_len), generator=torch.Generator().manual_seed(1))
    dst = Path(args.dst or tempfile.mkdtemp(prefix="rss_prof_"))
    t0 = time.perf_counter()
    summary = lb.quantize_checkpoint(args.src, dst, lb.recipes.get(args.recipe), calib, resume=False, progress=False)
    wall = time.perf_counter() - t0
    ph.stop = True
    print(f"peak RSS {_maxrss() / 2**30:.2f} GiB, wall {wall:.0f} s; units {summary.get('unit_seconds')}")
    import shutil

    if args.dst is None:
        shutil.rmtree(dst, ignore_errors=True)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
