"""What a benchmark ran on: CPU model and features, torch's CPU capability, threads.

Every benchmark prints :func:`header` first: a speed-up measured on one CPU class is not a claim
about another (AVX2 without VNNI, AVX-512, AVX-512 VNNI and AMX run different integer kernels).
"""
from __future__ import annotations

import os
import platform

import torch

_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_info() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"cpu": model, "features": [f for f in _FLAGS if f in flags],
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def header() -> str:
    i = cpu_info()
    return (f"# machine: {i['cpu']} ({i['cores']} cores), features {' '.join(i['features']) or 'none'}; "
            f"torch {i['torch']} capability {i['torch_capability']}; {i['threads']} threads")
