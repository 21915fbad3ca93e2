"""Peak memory of GPTQ and AWQ calibration: the bounded paths beside the former ones, in one run.

    python benchmarks/bench_calib_memory.py [--layers 8] [--hidden 512] [--seqs 32] [--tokens 256] [--quick]

A Llama-architecture model built from its config (random init, nothing downloaded), ``lb.quantize``
w4g128, calibrated on random token sequences. Each case runs in a fresh subprocess and reports the
peak resident memory above the baseline after the model (and its quantized copy) exist
(``ru_maxrss``), and the wall time:

* GPTQ block by block (``lb.gptq``, a chain of decoder layers: one block's inputs/outputs held)
  vs the former full-model passes replaying every finished block's recorded outputs (the same
  ``lb.gptq`` with the chain check refused);
* AWQ with one input's statistics at a time (``stats_budget=0``) and with the default budget
  (layers reading one input share one ``H``) vs the former all-at-once statistics (one
  ``d x d`` per linear layer during the one calibration pass, reproduced by making every layer's
  statistics keep ``H``; plus one unit's ``H`` of the new search, a slight overestimate).
  Each AWQ case includes the float model's copy that ``awq`` returns.

Numbers on a shared machine are noisy; the memory columns are not.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

import _machine


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _model(a):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=max(a.tokens, 128), tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def child(case: str, a) -> None:
    import lowbit as lb
    from lowbit.gptq import driver
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 1000, (1, a.tokens), generator=g)} for _ in range(a.seqs)]
    spec = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerGroup(128))
    m = _model(a)
    q = lb.quantize(m, weights=spec, exclude=["lm_head"]) if case.startswith("gptq") else None
    base = _rss()
    t = time.perf_counter()
    if case == "gptq-former":
        driver.chain_plan = lambda *args, **kw: False
    if case.startswith("gptq"):
        lb.gptq(q, batches)
    elif case == "awq-former":
        import importlib
        awq_mod = importlib.import_module("lowbit.transforms.awq")
        real = awq_mod._Stats.__init__

        def all_h(self, with_h=True):   # the former code: H for every linear layer during the trace
            real(self, True)
        awq_mod._Stats.__init__ = all_h
        lb.transforms.awq(m, batches, spec, exclude=["lm_head"], stats_budget=0)
    else:
        budget = 0 if case == "awq-one" else 1 << 28
        lb.transforms.awq(m, batches, spec, exclude=["lm_head"], stats_budget=budget)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"case": case, "extra_peak_mb": (peak - base) / 2**20, "wall_s": wall}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a 4-layer, 256-wide model on 8 x 128 tokens")
    ap.add_argument("--cases", default="gptq,awq", help="gptq, awq or both (comma-separated)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.layers, a.hidden, a.seqs, a.tokens = 4, 256, 8, 128
    if a.child:
        return child(a.child, a)
    torch.set_num_threads(a.threads)
    print(_machine.header())
    act_mb = a.seqs * a.tokens * a.hidden * 4 / 2**20
    print(f"# Llama {a.layers} layers, hidden {a.hidden}; calibration {a.seqs} x {a.tokens} tokens "
          f"(one block's activations: {act_mb:.1f} MB)")
    rows = {}
    wanted = a.cases.split(",")
    for case in ("gptq-blockwise", "gptq-former", "awq-one", "awq-default", "awq-former"):
        if case.split("-")[0] not in wanted:
            continue
        cmd = [sys.executable, __file__, "--child", case, "--layers", str(a.layers), "--hidden", str(a.hidden),
               "--seqs", str(a.seqs), "--tokens", str(a.tokens), "--threads", str(a.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[case] = json.loads(out)
        print(f"# {case}: {rows[case]}", file=sys.stderr, flush=True)
    print(f"\n{'case':34s} {'extra peak MB':>13s} {'wall s':>8s}")
    for case, r in rows.items():
        print(f"{case:34s} {r['extra_peak_mb']:13.1f} {r['wall_s']:8.1f}")
    if "gptq" in wanted:
        g_new, g_old = rows["gptq-blockwise"], rows["gptq-former"]
        print(f"\nGPTQ peak: block-wise / former = {g_new['extra_peak_mb'] / g_old['extra_peak_mb']:.2f}; "
              f"time ratio {g_new['wall_s'] / g_old['wall_s']:.2f}")
    if "awq" in wanted:
        a_new, a_old = rows["awq-one"], rows["awq-former"]
        print(f"AWQ peak: one input at a time / former = {a_new['extra_peak_mb'] / a_old['extra_peak_mb']:.2f}; "
              f"time ratio {a_new['wall_s'] / a_old['wall_s']:.2f}")


if __name__ == "__main__":
    main()
