"""Resident memory of a frozen, loaded quantized Llama-architecture model beside the float model.

Each measurement runs in a fresh process (``python bench_memory.py --child ...``) and reports
its peak resident set size (``ru_maxrss``) above the RSS right after ``import torch,
transformers, lowbit`` and one forward of a 1-layer model of the same architecture (the baseline:
imports, modeling modules, thread pools; what any model pays once):

* ``float``: the float32 model built from its config (random init), one forward on 64 tokens;
* ``load w4g128`` / ``load w8``: the model built on the ``meta`` device, ``lb.load`` of the
  checkpoint (peak during the load alone, then after a forward on 64 tokens).

The checkpoints are written first by another process: float model -> ``lb.quantize(...,
inplace=True)`` -> ``lb.freeze`` -> ``lb.save`` (round to nearest; embeddings int8 per row).

    python benchmarks/bench_memory.py [--layers 16 --hidden 1536 --intermediate 4608 --vocab 32000] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import _machine

RECIPES = {"w4g128": dict(bits=4, group=128), "w8": dict(bits=8, group=None)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config(a):
    import transformers
    return transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                    num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                                    num_key_value_heads=a.hidden // 256, max_position_embeddings=512)


def child(a) -> dict:
    import torch
    import transformers
    import lowbit as lb
    torch.set_num_threads(a.threads)
    # the baseline: imports plus the fixed costs of running this architecture at all (its modeling
    # modules, the thread pools and kernel caches of a first forward), paid once by any model
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1)).eval()
    with torch.no_grad():
        tiny(torch.zeros(1, 64, dtype=torch.long))
    del tiny
    base = _rss_mb()
    cfg = _config(a)
    ids = torch.randint(0, a.vocab, (1, 64), generator=torch.Generator().manual_seed(0))
    out = {"baseline_mb": base}
    if a.child == "float":
        model = transformers.LlamaForCausalLM(cfg).eval()
        out["params"] = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            model(ids)
    elif a.child == "write":
        model = transformers.LlamaForCausalLM(cfg).eval()
        r = RECIPES[a.recipe]
        g = lb.PerGroup(r["group"]) if r["group"] else lb.PerChannel(0)
        lb.quantize(model, weights=lb.QuantSpec(bits=r["bits"], granularity=g),
                    embeddings=lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)), inplace=True)
        lb.freeze(model)
        lb.save(model, a.path)
        out["file_mb"] = os.path.getsize(a.path) / 2**20
    else:  # load
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        q = lb.load(a.path, model).eval()
        out["load_peak_mb"] = _peak_mb() - base
        with torch.no_grad():
            q(ids)
        out["after_forward_mb"] = _rss_mb() - base
    out["peak_mb"] = _peak_mb() - base
    return out


def run_child(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=4608)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["float", "write", "load"])
    ap.add_argument("--recipe", choices=sorted(RECIPES))
    ap.add_argument("--path")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    shape = ["--layers", str(a.layers), "--hidden", str(a.hidden), "--intermediate", str(a.intermediate),
             "--vocab", str(a.vocab), "--threads", str(a.threads)]
    if not a.json:
        print(_machine.header(), file=sys.stderr)
        print(f"# Llama-architecture, {a.layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, "
              f"vocab {a.vocab}; RSS in MiB above the bare-import baseline, each row a fresh process", file=sys.stderr)
    flt = run_child(["--child", "float", *shape])
    rows = [{"model": "float32", "params": flt["params"], "peak_mb": flt["peak_mb"]}]
    with tempfile.TemporaryDirectory() as tmp:
        for name in RECIPES:
            path = os.path.join(tmp, f"{name}.safetensors")
            w = run_child(["--child", "write", "--recipe", name, "--path", path, *shape])
            ld = run_child(["--child", "load", "--path", path, *shape])
            rows.append({"model": f"lowbit {name} (lb.load into meta)", "file_mb": w["file_mb"],
                         "load_peak_mb": ld["load_peak_mb"], "load_vs_file": ld["load_peak_mb"] / w["file_mb"],
                         "after_forward_mb": ld["after_forward_mb"], "peak_mb": ld["peak_mb"],
                         "vs_float": ld["peak_mb"] / flt["peak_mb"], "quantize_peak_mb": w["peak_mb"]})
    result = {"machine": _machine.cpu_info(), "rows": rows}
    if a.json:
        print(json.dumps(result))
        return
    print(f"| model | params | file MiB | load peak MiB (x file) | RSS after forward | peak MiB | x float |")
    print("|---|---|---|---|---|---|---|")
    print(f"| float32 | {flt['params'] / 1e6:.0f}M | | | | {flt['peak_mb']:.0f} | 1.00 |")
    for r in rows[1:]:
        print(f"| {r['model']} | | {r['file_mb']:.0f} | {r['load_peak_mb']:.0f} ({r['load_vs_file']:.2f}x) | "
              f"{r['after_forward_mb']:.0f} | {r['peak_mb']:.0f} | {r['vs_float']:.3f} |")
    print("(quantize + freeze + save with inplace=True, peak MiB: "
          + ", ".join(f"{r['model'].split()[1]} {r['quantize_peak_mb']:.0f}" for r in rows[1:]) + ")")


if __name__ == "__main__":
    main()
