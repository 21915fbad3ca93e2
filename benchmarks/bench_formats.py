"""Number formats side by side at their stored bits per weight: the built-in CNNs and all-MiniLM-L6-v2.

    python benchmarks/bench_formats.py [--quick] [--models digits,mnist1d,minilm] [--formats int8,nf4,...]
                                       [--algorithms rtn,gptq,awq-gptq] [--sentences 512] [--calibration 512]
                                       [--threads 2] [--json]

Rows: a weight format (``int8`` / ``fp8_e4m3`` / ``fp8_e5m2`` / ``mxfp8`` per channel or block,
``int4 g32`` symmetric, ``int4 g128`` with zero points, ``nf4`` (blocks of 64), ``mxfp4``,
``nvfp4``) times how the weights are chosen: round to nearest (``rtn``), GPTQ with act_order
(``gptq``), AWQ column scales then GPTQ (``awq-gptq``, MiniLM only: AWQ needs a norm or an explicit
scale in front of each Linear). Activations stay float, so a row measures the weight format alone;
``bits/weight`` counts what is stored (codes, float16 scales of the free-scale formats, E8M0/E4M3
block scales of MX/NVFP4, one-byte zero points; :func:`lowbit.analysis.mixed_specs.storage_bits`).

* CNNs (``lowbit demo --formats`` runs the same table): test accuracy, its change in points,
  top-1 agreement with the float model and ``KL(float || quantized)`` of the predictions.
* MiniLM: mean cosine of each sentence embedding to the float one, on held-in sentences (the
  built-in technical corpus, disjoint from the calibration sentences but of the same domain) and
  on out-of-domain prose (:func:`lowbit.zoo.prose_sentences`: narrative, news, everyday English the
  calibration never saw). Embedding tables stay float in the format rows.
* MiniLM extra rows: the ``w4-mixed`` recipe (AWQ, a weight spec per layer from lowbit's
  sensitivity analysis within 4.5 stored bits per weight, GPTQ; int8 embeddings), the
  ``w4-nf4-mixed`` recipe (NF4 g32 with double-quantized scales or int8 per channel per layer within
  4.5 bits, GPTQ; int8 embeddings), and FP8 E4M3 W8A8 (per-channel weights, per-tensor static
  activations calibrated with min/max). Embedding tables are not counted in ``bits/weight``
  (the Linear layers only; the recipes store them as int8, the format rows keep them float).

Peers: the float model is the reference (ratios are cosines and accuracy deltas against it).
The machine is shared; the quantization seconds are wall time under that load.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _machine import cpu_info, header  # noqa: E402

from lowbit import recipes, zoo  # noqa: E402
from lowbit.analysis.mixed_specs import model_bits_per_weight  # noqa: E402
from lowbit.demo.formats import ALGORITHMS, FORMAT_ROWS, format_specs, run_formats  # noqa: E402
from lowbit.recipes import Recipe  # noqa: E402
from lowbit.spec import PerChannel, QuantSpec  # noqa: E402

CNNS = ("digits", "mnist1d")
MINILM_ALGORITHMS = {**ALGORITHMS, "awq-gptq": "awq-gptq"}
TARGETS = {"w4_4.5bpw_cosine_held_in": 0.995, "w4_4.5bpw_cosine_out_of_domain": 0.99, "fp8_w8a8_cosine": 0.998}
FOUR_BIT = ("int4 g32", "int4 g128", "nf4", "mxfp4", "nvfp4")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cnn_rows(name: str, formats, algorithms, calibration_batches: int, threads: int) -> dict:
    t0 = time.perf_counter()
    res = run_formats(name, formats, [a for a in algorithms if a in ALGORITHMS], calibration_batches, threads).as_dict()
    _progress(f"{name}: {len(res['formats'])} rows in {time.perf_counter() - t0:.0f}s")
    return res


def _minilm_recipe(label: str, spec: QuantSpec, alg: str) -> Recipe:
    steps = ALGORITHMS.get(alg) if alg != "awq-gptq" else (("awq", {"weights": spec}), ("gptq", {"act_order": True}))
    return Recipe(f"{label} {alg}", f"{label} weights, {alg}", spec, transforms=tuple(steps))


def minilm_rows(args, specs) -> dict:
    from lowbit.transformer import minilm
    from lowbit.transformer.sentence import quantize_sentence_model

    st = zoo.load_minilm()
    held = zoo.sentences(args.sentences)
    calib, _ = minilm.split_sentences(held, "builtin", args.calibration)
    ood = zoo.prose_sentences(None if args.ood is None else min(args.ood, len(zoo.prose_sentences())))
    ref_h, ref_o = zoo.encode(st, held), zoo.encode(st, ood)

    def measure(label: str, alg: str, rec: Recipe, bpw: float | None = None) -> dict:
        t0 = time.perf_counter()
        st_q = quantize_sentence_model(st, rec, calib if rec.needs_calibration else None, freeze=False)
        q = zoo.transformer_of(st_q)
        bpw = model_bits_per_weight(q) if bpw is None else bpw
        from lowbit import freeze

        freeze(q)
        seconds = time.perf_counter() - t0
        h = zoo.compare_embeddings(ref_h, zoo.encode(st_q, held))
        o = zoo.compare_embeddings(ref_o, zoo.encode(st_q, ood))
        row = {"format": label, "algorithm": alg, "bits_per_weight": bpw, "cosine_held_in": h.cosine_mean,
               "cosine_held_in_min": h.cosine_min, "cosine_out_of_domain": o.cosine_mean,
               "cosine_out_of_domain_min": o.cosine_min, "spearman_held_in": h.spearman,
               "spearman_out_of_domain": o.spearman, "quantize_seconds": seconds}
        _progress(f"  minilm {label} {alg}: {bpw:.2f} bits/weight, cosine held-in {h.cosine_mean:.4f} "
                  f"out-of-domain {o.cosine_mean:.4f} ({seconds:.0f}s)")
        return row

    rows = []
    for label, spec in specs:
        for alg in args.algorithms:
            if alg != "rtn" and label not in FOUR_BIT:
                continue            # 8-bit formats: round to nearest is already within noise of float
            rows.append(measure(label, alg, _minilm_recipe(label, spec, alg)))
    extra = []
    if args.mixed:
        extra.append(measure("w4-mixed (recipe)", "awq+mixed+gptq", recipes.get("w4-mixed")))
        extra.append(measure("w4-nf4-mixed (recipe)", "mixed+gptq", recipes.get("w4-nf4-mixed")))
    try:
        fp8 = QuantSpec(format="fp8_e4m3")
    except (TypeError, ValueError) as e:
        _progress(f"  FP8 W8A8 skipped: {e}")
    else:
        w = QuantSpec(format="fp8_e4m3", granularity=PerChannel(0))
        extra.append(measure("fp8_e4m3 W8A8", "rtn, static per-tensor activations",
                             Recipe("fp8-w8a8", "FP8 E4M3 W8A8", w, fp8)))
        if "gptq" in args.algorithms:
            extra.append(measure("fp8_e4m3 W8A8", "gptq, static per-tensor activations",
                                 Recipe("fp8-w8a8-gptq", "FP8 E4M3 W8A8, GPTQ", w, fp8,
                                        transforms=(("gptq", {"act_order": True}),))))
    return {"sentences_held_in": len(held), "sentences_out_of_domain": len(ood), "calibration_sentences": len(calib),
            "out_of_domain_source": zoo.PROSE_SOURCE, "formats": rows, "recipes": extra}


def _cnn_table(res: dict) -> str:
    lines = [f"{res['model']} on {res['dataset']}: float accuracy {100 * res['float']['accuracy']:.2f}%",
             "| format | weights by | bits/weight | accuracy | points | agree | KL |", "|---|---|---|---|---|---|---|"]
    for r in res["formats"]:
        lines.append(f"| {r['format']} | {r['algorithm']} | {r['bits_per_weight']:.2f} | {100 * r['accuracy']:.2f}% | "
                     f"{r['delta_points']:+.2f} | {100 * r['agreement']:.1f}% | {r['kl']:.2e} |")
    return "\n".join(lines)


def _minilm_table(res: dict) -> str:
    lines = [f"all-MiniLM-L6-v2: {res['sentences_held_in']} held-in sentences, {res['sentences_out_of_domain']} "
             f"out-of-domain, {res['calibration_sentences']} calibration sentences",
             "| weights | by | bits/weight | cosine held-in (min) | cosine out-of-domain (min) | quantize s |",
             "|---|---|---|---|---|---|"]
    for r in res["formats"] + res["recipes"]:
        lines.append(f"| {r['format']} | {r['algorithm']} | {r['bits_per_weight']:.2f} | {r['cosine_held_in']:.4f} "
                     f"({r['cosine_held_in_min']:.4f}) | {r['cosine_out_of_domain']:.4f} "
                     f"({r['cosine_out_of_domain_min']:.4f}) | {r['quantize_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small: digits + MiniLM on 64/32 sentences, 64 calibration, "
                    "int8/int4 g128/nf4/mxfp4, rtn and gptq")
    ap.add_argument("--models", default=",".join(CNNS + ("minilm",)))
    ap.add_argument("--formats", default=None, help=f"rows (default all of {[f for f, _ in FORMAT_ROWS]})")
    ap.add_argument("--algorithms", default="rtn,gptq,awq-gptq")
    ap.add_argument("--sentences", type=int, default=512, help="held-in evaluation sentences (built-in corpus)")
    ap.add_argument("--ood", type=int, default=None, help="out-of-domain sentences (default: all)")
    ap.add_argument("--calibration", type=int, default=512, help="MiniLM calibration sentences")
    ap.add_argument("--calibration-batches", type=int, default=8, help="CNN calibration batches of 64")
    ap.add_argument("--no-mixed", dest="mixed", action="store_false", help="skip the w4-mixed / w4-nf4-mixed rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.models = "digits,minilm"
        args.formats = args.formats or "int8,int4 g128,nf4,mxfp4"
        args.algorithms = "rtn,gptq"
        args.sentences, args.ood, args.calibration = 64, 32, 64
    models = [m for m in args.models.split(",") if m]
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    bad = [a for a in args.algorithms if a not in MINILM_ALGORITHMS]
    if bad:
        ap.error(f"--algorithms: unknown {bad}; choose from {list(MINILM_ALGORITHMS)}")
    formats = None if args.formats is None else [f.strip() for f in args.formats.split(",") if f.strip()]
    specs, skipped = format_specs(formats)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = {"machine": cpu_info(), "targets": TARGETS, "skipped_formats": skipped, "load_avg_1min": [os.getloadavg()[0]]}
    for m in models:
        if m in CNNS:
            out[m] = cnn_rows(m, formats, args.algorithms, args.calibration_batches, 1)
        elif m == "minilm":
            out["minilm"] = minilm_rows(args, specs)
        else:
            ap.error(f"--models: unknown {m!r}")
    out["load_avg_1min"].append(os.getloadavg()[0])
    out["seconds"] = time.perf_counter() - t0
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return
    print(header())
    print(f"load average (1 min) at start/end: {out['load_avg_1min']}; {out['seconds']:.0f} s in all")
    if skipped:
        print(f"formats not in this installation: {sorted(skipped)}")
    for m in models:
        print()
        print(_minilm_table(out[m]) if m == "minilm" else _cnn_table(out[m]))


if __name__ == "__main__":
    main()
