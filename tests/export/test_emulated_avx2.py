"""On a real AVX2 CPU without VNNI (emulated): the old int8 format saturates in ONNX Runtime, the
format lowbit writes is exact.

``qemu-x86_64 -cpu Haswell`` (Debian: ``apt-get install qemu-user``) runs this venv's Python with
an AVX2-only CPU, so ONNX Runtime picks its AVX2 U8S8 kernel (``VPMADDUBSW``), whatever the host.
The files are written here; under the emulator only onnxruntime and numpy run (~15 s). Skipped
without qemu-x86_64 or on a non-x86 host.
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.export import export_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
QEMU = shutil.which("qemu-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="needs qemu-x86_64 (apt-get install qemu-user) on an x86-64 host "
                                       "to emulate an AVX2 CPU without VNNI")

_RUNNER = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime as ort
    out = {}
    for path in sys.argv[2:]:
        so = ort.SessionOptions()          # ONNX Runtime's defaults: all graph optimizations
        so.log_severity_level = 3
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        x = np.load(sys.argv[1])
        out[path] = s.run(None, {s.get_inputs()[0].name: x})[0].tolist()
    print(json.dumps(out))
""")


def test_u8s8_saturates_and_lowbits_formats_are_exact_on_emulated_avx2(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    with torch.no_grad():   # full-range int8 weight codes, and inputs that use the whole u8 grid
        lin.weight.copy_(torch.randn(16, 64).sign() * torch.rand(16, 64).add(0.5))
    x = torch.rand(4, 8, 64) * 6 - 1          # 3-D: a MatMul (ONNX Runtime fuses its QDQ into int8 kernels)
    q = lb.quantize(nn.Sequential(lin), weights=lb.QuantSpec(8, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(8, signed=False, symmetric=False))
    with lb.calibrate(q):
        q(x)
    lb.freeze(q)
    with torch.no_grad():
        ref = q(x).numpy()
    paths = {}
    for label, kwargs in {"qdq-default": {}, "qdq-u8s8": {"int8_format": "u8s8"},
                          "integer-default": {"integer": True},
                          "integer-u8s8": {"integer": True, "int8_format": "u8s8"}}.items():
        paths[label] = str(tmp_path / f"{label}.onnx")
        info = export_onnx(q, x, paths[label], **kwargs)
        assert info.int8_formats["0"] == ("u8s8" if label.endswith("u8s8") else "u8u8")
    np.save(tmp_path / "x.npy", x.numpy())
    (tmp_path / "run.py").write_text(_RUNNER)
    proc = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(tmp_path / "run.py"), str(tmp_path / "x.npy"),
                           *paths.values()], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    err = {label: float(np.abs(np.array(out[p]) - ref).max()) for label, p in paths.items()}
    scale = float(np.abs(ref).max())
    # the formats lowbit writes by default: float rounding only
    assert err["qdq-default"] <= 1e-5 * scale and err["integer-default"] <= 1e-5 * scale, err
    # the old format (int8 weights against u8 activations) saturates in int16 on this CPU class
    assert err["qdq-u8s8"] > 1e-3 * scale and err["integer-u8s8"] > 1e-3 * scale, err
