"""Checkpoint sizes: float (torch.save and safetensors) beside lowbit W8 / W4 / W2 files, and save/load time.

    python benchmarks/bench_checkpoint.py
"""
from __future__ import annotations

import os
import struct
import tempfile
import time

import safetensors.torch
import torch
from torch import nn

import lowbit as lb

RECIPES = [
    ("W8 per-channel", lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))),
    ("W4 per-group 128", lb.QuantSpec(bits=4, granularity=lb.PerGroup(128))),
    ("W4 per-channel", lb.QuantSpec(bits=4, granularity=lb.PerChannel(0))),
    ("W2 per-channel", lb.QuantSpec(bits=2, granularity=lb.PerChannel(0))),
]


def linear512():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 512)), torch.randn(64, 512)


def small_cnn():
    """The shape of a digits CNN: 8x8 inputs, two convs with BatchNorm, two linear layers."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    return m, torch.randn(64, 1, 8, 8)


def _header(path):
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def main():
    a8 = lb.QuantSpec(bits=8, signed=False, symmetric=False)
    with tempfile.TemporaryDirectory() as d:
        for title, make in [("Linear 512x512", linear512), ("small CNN (digits shape)", small_cnn)]:
            m, x = make()
            m.eval()
            torch.save(m.state_dict(), os.path.join(d, "f.pt"))
            safetensors.torch.save_file(m.state_dict(), os.path.join(d, "f.safetensors"))
            f_pt, f_st = os.path.getsize(os.path.join(d, "f.pt")), os.path.getsize(os.path.join(d, "f.safetensors"))
            params = sum(p.numel() for p in m.parameters())
            print(f"## {title}: {params} parameters")
            print("| file | bytes | of which header | float / this | lb.save ms | lb.load ms | outputs equal after load |")
            print("|---|---|---|---|---|---|---|")
            print(f"| float, torch.save | {f_pt} | | {f_st / f_pt:.2f}x | | | |")
            print(f"| float, safetensors | {f_st} | {_header(os.path.join(d, 'f.safetensors'))} | 1.00x | | | |")
            for name, spec in RECIPES:
                q = lb.quantize(m, weights=spec, activations=a8)
                with lb.calibrate(q):
                    q(x)
                lb.freeze(q)
                path = os.path.join(d, "q.safetensors")
                t0 = time.perf_counter()
                lb.save(q, path)
                t1 = time.perf_counter()
                q2 = lb.load(path, make()[0])
                t2 = time.perf_counter()
                size = os.path.getsize(path)
                print(f"| {name} + A8 | {size} | {_header(path)} | {f_st / size:.2f}x | {(t1 - t0) * 1e3:.1f} | {(t2 - t1) * 1e3:.1f} "
                      f"| {torch.equal(q2(x), q(x))} |")
            print()


if __name__ == "__main__":
    main()
