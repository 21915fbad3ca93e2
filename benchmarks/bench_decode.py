"""Batch-1 greedy decoding speed of a Llama-architecture model: float beside lowbit's frozen models.

``model.generate(ids, max_new_tokens=N, do_sample=False)`` with the KV cache, batch 1, a 16-token
prompt, ``--threads`` threads; each path runs ``--repeats`` times round-robin (so a change of
machine load hits every path alike) and the median wall time counts. Paths:

    float32 | bfloat16 (the float model cast) | torch.ao quantize_dynamic int8 (peer) |
    torchao int4 / int8 weight-only (peer, only if the torchao package is installed and runs here) |
    lowbit w8 (int8 per channel) and w4g128 (int4, groups of 128), frozen (kernel="auto"):
        the float32 model | the model cast to bfloat16 | with --exact, kernel="dequantize" (the exact path)

For each: tokens/s, speed-up over float32, and the fraction of the memory-bandwidth limit reached
(bytes of weights read per token / the machine's measured copy bandwidth = the fastest a token can
be). Fidelity: with the float32 model's generated sequence as input (teacher forcing), the share of
positions whose next-token argmax equals float32's (random-init models have flat logits, so this is
a strict test) and the mean cosine of the logits.

    python benchmarks/bench_decode.py [--new-tokens 128] [--repeats 3] [--threads 2] [--exact] [--json]
"""
from __future__ import annotations

import argparse
import copy
import json
import warnings
import statistics
import sys
import time

import torch
import transformers

import _machine
import lowbit as lb
from lowbit.quantize import quant_embeddings, quant_layers


def bandwidth_gbs() -> float:
    """Copy bandwidth (read + write) of a 256 MiB buffer, best of 5, GB/s."""
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decoding step reads: every weight of a matrix product (the embedding table is a lookup)."""
    total = 0
    layers = dict(quant_layers(model))
    for name, m in model.named_modules():
        if name in layers:
            total += layers[name].qweight.nbytes
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            w = m.weight()
            total += w.numel() * w.element_size()
    return total


def quantized(model, bits: int, group: int | None, kernel: str, dtype: torch.dtype):
    g = lb.PerGroup(group) if group else lb.PerChannel(0)
    q = lb.quantize(model, weights=lb.QuantSpec(bits=bits, granularity=g))
    lb.freeze(q, kernel=kernel)
    return q.to(dtype)


def torchao_paths(model) -> dict:
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001
        print(f"# torchao: not measured ({type(e).__name__}: {e}); pip install torchao to add it", file=sys.stderr)
        return {}
    out = {}
    for name, cfg in (("torchao int8 weight-only (bf16)", Int8WeightOnlyConfig()),
                      ("torchao int4 weight-only g128 (bf16)", Int4WeightOnlyConfig(group_size=128))):
        try:
            m = copy.deepcopy(model).to(torch.bfloat16)
            quantize_(m, cfg)
            out[name] = m
        except Exception as e:  # noqa: BLE001
            print(f"# {name}: does not run here ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small model, few tokens (a smoke run)")
    ap.add_argument("--exact", action="store_true", help="also time lowbit's exact kernel=dequantize path (slow)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.layers, a.hidden, a.intermediate, a.vocab, a.new_tokens, a.repeats = 2, 256, 512, 1000, 8, 1
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                   num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                                   num_key_value_heads=a.hidden // 64, max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, a.vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    paths = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.ao's deprecation notices
        paths["torch.ao quantize_dynamic int8"] = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    paths.update(torchao_paths(model))
    for name, bits, group in (("w8", 8, None), ("w4g128", 4, 128)):
        paths[f"lowbit {name} float32"] = quantized(model, bits, group, "auto", torch.float32)
        paths[f"lowbit {name} bfloat16"] = quantized(model, bits, group, "auto", torch.bfloat16)
        if a.exact:
            paths[f"lowbit {name} float32, kernel=dequantize"] = quantized(model, bits, group, "dequantize",
                                                                           torch.float32)
    kwargs = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
    times = {n: [] for n in paths}
    tokens = {}
    with torch.inference_mode():
        for m in paths.values():                         # warm-up (and first-call setup) outside the timing
            m.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        for _ in range(a.repeats):
            for name, m in paths.items():
                t = time.perf_counter()
                out = m.generate(ids, **kwargs)
                times[name].append(time.perf_counter() - t)
                tokens[name] = out[0, ids.shape[1]:]
    bw = bandwidth_gbs()
    seq = torch.cat([ids[0], tokens["float32"]])[None]
    logits = {}
    with torch.inference_mode():
        for name, m in paths.items():
            logits[name] = m(seq).logits[0, ids.shape[1] - 1:-1].float()
    rows = []
    base = statistics.median(times["float32"])
    for name, m in paths.items():
        t = statistics.median(times[name])
        wb = weight_bytes(m)
        ideal = wb / (bw * 1e9) * a.new_tokens
        rows.append({"path": name, "seconds": t, "tokens_per_s": a.new_tokens / t, "vs_float32": base / t,
                     "weight_mb": wb / 2**20, "bandwidth_fraction": ideal / t,
                     "top1_agree": float((logits[name].argmax(-1) == logits["float32"].argmax(-1)).float().mean()),
                     "logit_cosine": float(torch.nn.functional.cosine_similarity(
                         logits[name], logits["float32"], dim=-1).mean())})
    result = {"machine": _machine.cpu_info(), "bandwidth_gbs": bw, "new_tokens": a.new_tokens, "rows": rows}
    if a.json:
        print(json.dumps(result))
        return
    print(_machine.header())
    print(f"# Llama-architecture {a.layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, vocab "
          f"{a.vocab}; greedy generate of {a.new_tokens} tokens, batch 1, median of {a.repeats}; copy bandwidth "
          f"{bw:.1f} GB/s")
    print("| path | s | tokens/s | x float32 | weights MiB | of bandwidth limit | top-1 = float32 | logit cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | {r['vs_float32']:.2f}x | "
              f"{r['weight_mb']:.0f} | {r['bandwidth_fraction']:.0%} | {r['top1_agree']:.1%} | {r['logit_cosine']:.4f} |")


if __name__ == "__main__":
    main()
