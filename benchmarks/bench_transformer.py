"""lowbit on all-MiniLM-L6-v2 beside torch and ONNX Runtime dynamic int8, on the same sentences, in one run.

    python benchmarks/bench_transformer.py [--sentences 512] [--calibration 512] [--threads 2] [--repeats 2]
                                           [--recipes w8a8,w8a8-smooth,...] [--backends onnxruntime,torch]
                                           [--skip-peers] [--json]

Rows (every one compared with the float model's embeddings of the same sentences):

* float: the SentenceTransformer as loaded (torch), the reference, and its encode time;
* torch dynamic int8: ``torch.ao.quantization.quantize_dynamic`` on the inner transformer's nn.Linear
  (int8 weights per tensor, activations quantized per tensor at run time, fbgemm kernels);
* ORT float / ORT dynamic int8: the float transformer exported with ``torch.onnx.export`` and
  ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights) on that graph, run by ONNX Runtime;
* lowbit recipes, each on every execution backend available (``lowbit.transformer.backends``;
  ``torch`` is lowbit's fake-quant modules, ``onnxruntime`` the exported QDQ graph once
  ``lowbit.export`` provides it), with the quantization time (wall and CPU).

Columns: mean / min per-sentence cosine to float, Spearman of pairwise similarities, encode wall
seconds (best of ``--repeats``) and its CPU seconds, speed-up vs the torch float encode, stored size.
Calibration uses ``--calibration`` built-in sentences that are not evaluated. The machine is shared:
wall times are noisy, CPU seconds less so; the load average is printed.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

import lowbit as lb  # noqa: F401
from lowbit import recipes, zoo
from lowbit.transformer import backends, minilm, model_bytes, weight_bytes, with_transformer
from lowbit.transformer.sentence import quantize_sentence_model

DEFAULT_RECIPES = ["w8a8", "w8a8-smooth", "w8a8-dynamic", "w8a8-smooth-dynamic", "w4g128", "w4g128-gptq",
                   "w4g128-awq-gptq"]
DEFAULT_BACKENDS = ["onnxruntime", "torch"]
TARGETS = {"w8a8_cosine": 0.995, "w8a8_speedup": 1.7, "w4_cosine": 0.99, "w4_storage_ratio": 7.0,
           "quantize_cpu_seconds": 60.0}


class OrtEncoder(nn.Module):
    """An ONNX Runtime session called like a Hugging Face BertModel (returns ``last_hidden_state``)."""

    def __init__(self, path: str, threads: int, config) -> None:
        super().__init__()
        import onnxruntime as ort

        self.config = config          # sentence-transformers reads the model's config

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        feed = {n: kwargs[n].detach().cpu().numpy() for n in self.names}
        return BaseModelOutput(last_hidden_state=torch.from_numpy(self.session.run(None, feed)[0]))


class _Hidden(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.m(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids).last_hidden_state


def export_float(inner: nn.Module, example: dict, path: str) -> str:
    """The float transformer as ONNX (dynamo exporter, dynamic batch and sequence); legacy exporter as fallback."""
    w = _Hidden(inner).eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            b, t = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(w, (), path, kwargs={n: example[n] for n in names}, dynamo=True,
                              dynamic_shapes={n: {0: b, 1: t} for n in names}, opset_version=18, verbose=False)
            return "dynamo"
        except Exception as e:  # noqa: BLE001 - report and fall back
            print(f"dynamo export failed ({type(e).__name__}); legacy exporter", file=sys.stderr)
            torch.onnx.export(w, tuple(example[n] for n in names), path, dynamo=False, input_names=names,
                              output_names=["last_hidden_state"], opset_version=17,
                              dynamic_axes={n: {0: "b", 1: "t"} for n in names + ["last_hidden_state"]})
            return "legacy"


def _torch_bytes(m: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    return buf.tell()


def _onnx_bytes(path: str) -> int:
    """The graph file plus its external weights file (the dynamo exporter writes ``<name>.data``)."""
    return os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)


def measure(name: str, st_like: nn.Module, ref: torch.Tensor, texts: list[str], args, base: float, **extra) -> dict:
    emb, wall, cpu = minilm.timed_encode(st_like, texts, repeats=args.repeats, threads=args.threads)
    a = zoo.compare_embeddings(ref, emb)
    row = {"name": name, "cosine_mean": a.cosine_mean, "cosine_min": a.cosine_min, "spearman": a.spearman,
           "seconds": wall, "cpu_seconds": cpu, "speedup": base / wall}
    row.update(extra)
    print(f"  {name}: cos {a.cosine_mean:.5f} (min {a.cosine_min:.4f}) rho {a.spearman:.4f} {wall:.2f}s "
          f"({cpu:.2f} cpu) {base / wall:.2f}x", file=sys.stderr, flush=True)
    return row


def peers(st, inner, ref, texts, args, base, tmp) -> list[dict]:
    rows = []
    t0, c0 = time.perf_counter(), time.process_time()
    qd = torch.ao.quantization.quantize_dynamic(copy.deepcopy(inner), {nn.Linear}, dtype=torch.qint8)
    qt = {"quantize_seconds": time.perf_counter() - t0, "quantize_cpu_seconds": time.process_time() - c0}
    rows.append(measure("torch dynamic int8", with_transformer(st, qd), ref, texts, args, base,
                        size_bytes=_torch_bytes(qd), **qt))
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        print("onnxruntime is not installed: ORT rows skipped", file=sys.stderr)
        return rows
    example = zoo.tokenized_batches(st, texts[:8], batch_size=8)[0]
    f32, i8 = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
    exporter = export_float(inner, example, f32)
    ort_f = with_transformer(st, OrtEncoder(f32, args.threads, inner.config))
    row_f = measure("ORT float", ort_f, ref, texts, args, base, size_bytes=_onnx_bytes(f32), exporter=exporter)
    rows.append(row_f)
    t0, c0 = time.perf_counter(), time.process_time()
    quantize_dynamic(f32, i8, weight_type=QuantType.QInt8)
    qt = {"quantize_seconds": time.perf_counter() - t0, "quantize_cpu_seconds": time.process_time() - c0}
    ort_q = with_transformer(st, OrtEncoder(i8, args.threads, inner.config))
    row = measure("ORT dynamic int8", ort_q, ref, texts, args, base, size_bytes=_onnx_bytes(i8), **qt)
    row["speedup_vs_ort_float"] = row_f["seconds"] / row["seconds"]
    rows.append(row)
    return rows


def lowbit_rows(st, ref, texts, calib, args, base) -> list[dict]:
    rows = []
    trial = zoo.tokenized_batches(st, texts[:8], batch_size=8)
    for name in args.recipes:
        rec = recipes.get(name)
        torch.set_num_threads(args.threads)
        st_q = quantize_sentence_model(st, rec, calib if rec.needs_calibration else None)
        q = zoo.transformer_of(st_q)
        wb = weight_bytes(q)
        for bk in [b for b in args.backends if b in backends.available()]:
            try:
                runner = backends.build(bk, q, trial[0], args.threads)
            except (ValueError, TypeError, RuntimeError, NotImplementedError, ImportError) as e:
                print(f"  lowbit {name} on {bk}: cannot run ({e})", file=sys.stderr)
                continue
            rows.append(measure(f"lowbit {name} [{bk}]", with_transformer(st_q, runner) if runner is not q else st_q,
                                ref, texts, args, base, recipe=name, backend=bk, description=rec.description,
                                size_bytes=model_bytes(q), weight_bytes=wb.quantized, weight_ratio=wb.ratio,
                                quantize_seconds=st_q.lowbit_seconds["wall"],
                                quantize_cpu_seconds=st_q.lowbit_seconds["cpu"]))
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | mean cos | min cos | Spearman | encode s (CPU s) | vs float | size MB | quantize s (CPU s) |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        q = (f"{r['quantize_seconds']:.1f} ({r['quantize_cpu_seconds']:.1f})" if "quantize_seconds" in r else "")
        size = f"{r['size_bytes'] / 1e6:.1f}" if r.get("size_bytes") else ""
        if r.get("weight_ratio"):
            size += f" (weights {r['weight_ratio']:.2f}x smaller)"
        lines.append(f"| {r['name']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['spearman']:.4f} | "
                     f"{r['seconds']:.2f} ({r['cpu_seconds']:.2f}) | {r['speedup']:.2f}x | {size} | {q} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES))
    ap.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                    help="lowbit execution backends to time, where available (also: fast-ort, fast-torch, integer)")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.backends = [b for b in args.backends.split(",") if b]
    for r in args.recipes:
        recipes.get(r)
    torch.set_num_threads(args.threads)
    st = zoo.load_minilm()
    inner = zoo.transformer_of(st)
    texts = zoo.sentences(args.sentences)
    calib, _ = minilm.split_sentences(texts, "builtin", args.calibration)
    load0 = os.getloadavg()[0]
    ref, wall, cpu = minilm.timed_encode(st, texts, repeats=args.repeats, threads=args.threads)
    rows = [{"name": "float (torch)", "cosine_mean": 1.0, "cosine_min": 1.0, "spearman": 1.0, "seconds": wall,
             "cpu_seconds": cpu, "speedup": 1.0, "size_bytes": model_bytes(inner)}]
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        if not args.skip_peers:
            rows += peers(st, inner, ref, texts, args, wall, tmp)
        rows += lowbit_rows(st, ref, texts, calib, args, wall)
    out = {"torch": torch.__version__, "threads": args.threads, "sentences": len(texts),
           "calibration_sentences": len(calib), "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
           "backends_available": backends.available(), "targets": TARGETS, "rows": rows}
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print(f"all-MiniLM-L6-v2, {len(texts)} sentences, {len(calib)} calibration sentences, {args.threads} threads, "
              f"torch {torch.__version__}, load average {out['load_avg_1min']}, backends {out['backends_available']}")
        print(table(rows))


if __name__ == "__main__":
    main()
