"""The architecture x recipe table of docs/models.md, measured on small random-init models.

    python benchmarks/arch_table.py [--quick] [--json]

Each Hugging Face architecture (GPT-2, Llama, Qwen2, Gemma2, Mistral, Phi-3, OPT, BERT; 2 layers,
hidden 64, built offline from its config with tied embeddings, norm weights perturbed) goes through
each recipe (``w8a8`` and ``w4g128`` as their transformer variants, ``w8``, ``w4g32``). A row says
whether it ran, the cosine of the quantized model's logits to the float model's on a held-out batch
(random-init models: a smoke number, not an accuracy claim), the modules that stayed float grouped by
their reason, and what happened to the tied lm_head. ``--quick`` searches AWQ on 4 alphas instead of 20.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import lowbit as lb  # noqa: E402
from _archs import ARCHS, batches, build  # noqa: E402

RECIPES = ("w8a8", "w8", "w4g128", "w4g32")


def _header() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"# {cpu}; torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads")


def _float_kinds(q, cov) -> str:
    kinds = collections.Counter(type(q.get_submodule(n)).__name__ for n in cov.float)
    return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))


def row(arch: str, recipe: str, quick: bool) -> dict:
    m = build(arch, tied=True)
    calib, test = batches(2), batches(3)[2:]
    rec = lb.recipes.get(recipe, family="transformer")
    if quick and rec.transforms and rec.transforms[0][0] == "awq":
        rec = dataclasses.replace(rec, transforms=(("awq", dict(rec.transforms[0][1], grid=4)),) + rec.transforms[1:])
    try:
        q = rec.apply(m, calib)
    except Exception as e:  # noqa: BLE001 - the table reports it
        return {"arch": arch, "recipe": rec.name, "runs": False, "error": f"{type(e).__name__}: {e}"}
    with torch.no_grad():
        a, b = m(**test[0]).logits, q(**test[0]).logits
    cov = lb.coverage(q)
    tie = ("kept: one set of codes" if cov.tied else
           ("untied: " + "; ".join(cov.untied)) if cov.untied else "not tied")
    return {"arch": arch, "recipe": rec.name, "runs": True,
            "cosine": torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0).item(),
            "quantized": len(cov.quantized), "linear_like_float": cov.linear_like_float,
            "float": _float_kinds(q, cov), "tie": tie}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = [row(a, r, args.quick) for a in ARCHS for r in RECIPES]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        return
    print(_header())
    print("| architecture | recipe | runs | logits cosine | quantized | Linear-like float | stays float (by kind) | tied lm_head |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["runs"]:
            print(f"| {r['arch']} | {r['recipe']} | no: {r['error']} | | | | | |")
            continue
        print(f"| {r['arch']} | {r['recipe']} | yes | {r['cosine']:.4f} | {r['quantized']} | "
              f"{len(r['linear_like_float'])} | {r['float']} | {r['tie']} |")


if __name__ == "__main__":
    main()
