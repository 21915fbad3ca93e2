"""Streamed, resumable quantization of a checkpoint larger than memory (issue 12).

1. **Big run.** Writes a synthetic Llama-architecture float32 checkpoint of ``--params`` parameters
   (default 3e9: hidden 3200, MLP 8640, 32 heads, vocab 32000 -> 23 layers, 12.2 GB of shards)
   shard by shard (one tensor in memory at a time, random normal init, std 0.02), then runs
   ``lb.quantize_checkpoint`` with ``w4g128-gptq`` (int4 groups of 128, GPTQ with act_order,
   int8 embeddings) on 32 x 256-token calibration sequences in a fresh process, and prints that
   process's peak resident memory (``ru_maxrss`` of the child, as ``/usr/bin/time -v`` reports it)
   and wall time. ``--layers N`` keeps the width and uses ``N`` layers (peak memory does not depend
   on the depth; time grows linearly with it). ``--blocks K`` stops the run once the head and
   ``K`` decoder layers are done (killed there, as a power loss would: the output is resumable) and
   extrapolates the full run's time from the measured blocks.
2. **Overhead.** On a small model that fits in memory (hidden 512, 4 layers), the same recipe and
   calibration in memory (``from_pretrained`` -> ``Recipe.apply`` -> ``lb.save``) and streamed
   (``lb.quantize_checkpoint``), each in a fresh process: wall time ratio (target <= 1.3x) and
   both peak RSS values.

    python benchmarks/bench_stream.py [--params 3e9] [--layers N] [--blocks K] [--threads T] [--quick] [--json] [--dir DIR]

``--quick`` shrinks everything (a 30M-parameter model, 4 x 64-token calibration) for a smoke test.
The checkpoint goes to a temporary directory (``--dir``) and is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import _machine

HERE = Path(__file__).resolve().parent


def llama_config(params: float, layers: int | None, quick: bool) -> dict:
    if quick:
        hidden, inter, heads, vocab = 256, 768, 8, 8000
        layers = layers or 4
    else:
        hidden, inter, heads, vocab = 3200, 8640, 32, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    if layers is None:
        layers = max(1, math.ceil((params - 2 * vocab * hidden) / per_layer))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": heads,
            "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32", "dtype": "float32",
            "hidden_act": "silu", "rope_theta": 10000.0}


def _tensors(cfg: dict):
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    yield "model.embed_tokens.weight", (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            yield p + f"self_attn.{n}_proj.weight", (h, h)
        yield p + "mlp.gate_proj.weight", (f, h)
        yield p + "mlp.up_proj.weight", (f, h)
        yield p + "mlp.down_proj.weight", (h, f)
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def write_checkpoint(cfg: dict, out: Path, shard_bytes: int = 2 * 2**30) -> int:
    """Write ``cfg``'s float32 checkpoint shard by shard (one tensor in memory at a time); returns bytes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    shards, cur, size = [], [], 0
    for name, shape in _tensors(cfg):
        n = math.prod(shape) * 4
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, entries in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shape in entries:
            n = math.prod(shape) * 4
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(out / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(head)) + head)
            for name, shape in entries:
                t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
                fh.write(t.numpy().tobytes())
                del t
        total += off
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    return total


def _child(args) -> None:
    """One measured run in this fresh process; prints a JSON line."""
    import lowbit as lb

    torch.manual_seed(0)
    recipe = lb.recipes.get(args.recipe)
    calib = torch.load(args.calib, weights_only=True)
    t0 = time.perf_counter()
    if args.child == "stream":
        s = lb.quantize_checkpoint(args.src, args.dst, recipe, calib, progress=not args.json, resume=False)
        out = {"seconds": time.perf_counter() - t0, "summary": s}
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32).eval()
        q = recipe.apply(model, list(calib.split(1)))
        Path(args.dst).mkdir(parents=True, exist_ok=True)
        lb.save(q, Path(args.dst) / "model.safetensors")
        out = {"seconds": time.perf_counter() - t0}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out))


def _vm_hwm(pid: int) -> int:
    """The process's resident high-water mark so far (``VmHWM``), in bytes (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _measure(kind: str, src: Path, dst: Path, calib: Path, recipe: str, quiet: bool, blocks: int | None = None) -> dict:
    """One run in a fresh process; its peak RSS from ``wait4`` (exactly what ``/usr/bin/time -v``
    reports), and for a streamed run each unit's wall time and the peak RSS reached by its end
    (``lowbit-progress.json`` and ``VmHWM`` polled every 0.2 s; the first unit's time includes the
    process start-up and the skeleton). ``blocks``: stop the streamed run
    once the head and ``blocks`` decoder layers are done (the runner's kill hook, exactly as a power
    loss there: ``dst`` is left resumable)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--src", str(src), "--dst", str(dst),
           "--calib", str(calib), "--recipe", recipe, "--threads", str(torch.get_num_threads())] + (["--json"] if quiet else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}
    if blocks is not None:
        env["_LOWBIT_STREAM_KILL"] = f"{blocks}:done"   # unit `blocks` is decoder layer blocks - 1
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=None if not quiet else subprocess.PIPE, text=True)
    progress, units, seen = dst / "lowbit-progress.json", [], 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        hwm = usage.ru_maxrss * 1024 if pid else _vm_hwm(proc.pid)   # gone: its final peak
        try:
            done = json.loads(progress.read_text())["done"] if kind == "stream" else []
        except (OSError, ValueError, KeyError):
            done = []
        for unit in done[seen:]:
            units.append({"unit": unit, "done_at_s": time.perf_counter() - t0, "peak_rss_bytes_so_far": hwm})
        seen = max(seen, len(done))
        if pid:
            break
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out_text = proc.stdout.read()
    err_text = proc.stderr.read() if proc.stderr is not None else ""
    killed = blocks is not None and proc.returncode == -9
    if proc.returncode != 0 and not killed:
        raise SystemExit(f"{kind} run failed ({proc.returncode}): {err_text[-3000:]}")
    prev = 0.0
    for u in units:
        u["seconds"], prev = u["done_at_s"] - prev, u["done_at_s"]
    if killed:
        res = {"seconds": wall, "stopped_after_units": len(units), "summary": {}}
    else:
        line = next(l for l in out_text.splitlines() if l.startswith("RESULT "))
        res = json.loads(line[7:])
    res["process_wall_s"] = wall
    res["peak_rss_bytes"] = usage.ru_maxrss * 1024   # this child's own peak (Linux: KiB)
    res["units"] = units
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=3e9)
    ap.add_argument("--layers", type=int, default=None, help="same width, this many layers")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dir", default=None, help="scratch directory for the checkpoints (default: a temp dir)")
    ap.add_argument("--recipe", default="w4g128-gptq")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every run (default: torch's)")
    ap.add_argument("--blocks", type=int, default=None,
                    help="big run: stop after the head and this many decoder layers (killed there, resumable)")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--child", choices=["stream", "memory"])
    ap.add_argument("--src"), ap.add_argument("--dst"), ap.add_argument("--calib")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return _child(args)
    print(_machine.header(), file=sys.stderr if args.json else sys.stdout)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_stream_"))
    root.mkdir(parents=True, exist_ok=True)
    seqs, seq_len = (4, 64) if args.quick else (32, 256)
    result = {"machine": _machine.cpu_info(), "recipe": args.recipe, "calibration": f"{seqs} x {seq_len} tokens"}
    try:
        if not args.skip_big:
            cfg = llama_config(args.params, args.layers, args.quick)
            src = root / "big"
            t0 = time.perf_counter()
            size = write_checkpoint(cfg, src)
            t_write = time.perf_counter() - t0
            n_params = size // 4
            calib = root / "calib_big.pt"
            torch.save(torch.randint(0, cfg["vocab_size"], (seqs, seq_len), generator=torch.Generator().manual_seed(1)),
                       calib)
            r = _measure("stream", src, root / "big_out", calib, args.recipe, args.json, blocks=args.blocks)
            out_bytes = sum(p.stat().st_size for p in (root / "big_out").glob("*.safetensors"))
            unit_seconds = r["summary"].get("unit_seconds") or {u["unit"]: round(u["seconds"], 1) for u in r["units"]}
            complete = "stopped_after_units" not in r
            result["big"] = {"params": n_params, "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
                             "float_bytes": size, "write_seconds": t_write, "stream_seconds": r["seconds"],
                             "complete": complete, "peak_rss_bytes": r["peak_rss_bytes"], "output_bytes": out_bytes,
                             "unit_seconds": unit_seconds,
                             "peak_rss_by_unit": {u["unit"]: u["peak_rss_bytes_so_far"] for u in r["units"]}}
            blocks = [v for k, v in unit_seconds.items() if k.startswith("layer")]
            per_block = sum(blocks) / max(len(blocks), 1)
            full_layers = llama_config(args.params, None, args.quick)["num_hidden_layers"]
            rest = r["seconds"] - sum(blocks)   # start-up, head (and, when complete, tail and index)
            result["big"]["seconds_per_block"] = per_block
            result["big"]["full_depth_layers"] = full_layers
            result["big"]["full_depth_estimate_seconds"] = rest + per_block * full_layers
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(root / "big_out", ignore_errors=True)
            if not args.json:
                b = result["big"]
                print(f"big: {b['params'] / 1e9:.2f}B params ({b['layers']} layers x hidden {b['hidden']}), "
                      f"{size / 1e9:.1f} GB float32 shards written in {t_write:.0f} s")
                what = "complete" if complete else f"stopped after the head and {args.blocks} decoder layers (--blocks)"
                print(f"  streamed {args.recipe}, {what}: {b['stream_seconds']:.0f} s, peak RSS "
                      f"{b['peak_rss_bytes'] / 2**30:.2f} GiB = {b['peak_rss_bytes'] / 1e9:.2f} GB (target <= 4 GB: "
                      f"{'met' if b['peak_rss_bytes'] <= 4e9 else 'MISSED'}), output {'' if complete else 'so far '}"
                      f"{out_bytes / 1e9:.2f} GB")
                print("  per unit: " + ", ".join(f"{k} {v:.0f} s" for k, v in unit_seconds.items()))
                if b["peak_rss_by_unit"]:
                    print("  peak RSS by the end of each unit (GiB): " + ", ".join(
                        f"{k} {v / 2**30:.2f}" for k, v in b["peak_rss_by_unit"].items()))
                if b["layers"] != b["full_depth_layers"] or not complete:
                    print(f"  {b['seconds_per_block']:.0f} s per block: the full {b['full_depth_layers']}-layer model "
                          f"(--params {args.params:.3g}) would take about {b['full_depth_estimate_seconds'] / 60:.0f} min"
                          f"{'' if complete else ' plus the tail (lm_head)'} at the same peak memory (one block resident "
                          "at a time)")
        if not args.skip_overhead:
            small = llama_config(0, 2 if args.quick else 4, True)
            if not args.quick:
                small.update(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8)
            src = root / "small"
            write_checkpoint(small, src)
            calib = root / "calib_small.pt"
            torch.save(torch.randint(0, small["vocab_size"], (seqs // 4 if args.quick else 8, seq_len),
                                     generator=torch.Generator().manual_seed(2)), calib)
            mem = _measure("memory", src, root / "small_mem", calib, args.recipe, True)
            st = _measure("stream", src, root / "small_stream", calib, args.recipe, True)
            ratio = st["seconds"] / mem["seconds"]
            result["overhead"] = {"layers": small["num_hidden_layers"], "hidden": small["hidden_size"],
                                  "memory_seconds": mem["seconds"], "stream_seconds": st["seconds"], "ratio": ratio,
                                  "memory_peak_rss_bytes": mem["peak_rss_bytes"],
                                  "stream_peak_rss_bytes": st["peak_rss_bytes"]}
            if not args.json:
                print(f"overhead ({small['num_hidden_layers']} layers x hidden {small['hidden_size']}, "
                      f"{torch.load(calib).shape[0]} x {seq_len} tokens, {args.recipe}):")
                print(f"  {'path':<10} {'wall s':>8} {'peak RSS GiB':>13}")
                print(f"  {'in memory':<10} {mem['seconds']:>8.1f} {mem['peak_rss_bytes'] / 2**30:>13.2f}")
                print(f"  {'streamed':<10} {st['seconds']:>8.1f} {st['peak_rss_bytes'] / 2**30:>13.2f}")
                print(f"  streamed / in memory: {ratio:.2f}x wall time (target <= 1.3x: "
                      f"{'met' if ratio <= 1.3 else 'MISSED'}), {st['peak_rss_bytes'] / mem['peak_rss_bytes']:.2f}x peak RSS")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
