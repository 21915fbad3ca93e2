"""What a benchmark ran on: CPU model and features, torch's CPU capability, threads.

Every benchmark prints :func:`header` first: a speed-up measured on one CPU class is not a claim
about another (AVX2 without VNNI, AVX-512, AVX-512 VNNI and AMX run different integer kernels).
The CPU is read by :func:`lowbit.integer.cpu.cpu_info`, the detection the library itself uses.
"""
from __future__ import annotations

import os

import torch

from lowbit.integer.cpu import cpu_info as _lowbit_cpu_info


def cpu_info() -> dict:
    i = _lowbit_cpu_info()
    return {"cpu": i.model, "features": sorted(i.flags), "int8_class": i.int8_class,
            "torch_capability": i.torch_capability, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def header() -> str:
    i = cpu_info()
    return (f"# machine: {i['cpu']} ({i['cores']} cores), features {' '.join(i['features']) or 'none'} "
            f"(int8 class {i['int8_class']}); torch {i['torch']} capability {i['torch_capability']}; "
            f"{i['threads']} threads")
