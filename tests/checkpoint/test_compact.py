"""Format version 2 (lowbit.checkpoint.compact): the compact map reads back as the full one, and
version-1 files (the full map) still load bit-identically."""
import json
import struct

import pytest
import safetensors.torch
import torch
from torch import nn

import lowbit as lb
from lowbit.checkpoint import read_quant_map, writer

A8 = lb.QuantSpec(bits=8, symmetric=False)
A8SYM_U = lb.QuantSpec(bits=8, signed=False)               # symmetric unsigned: zero point 128, implied
W4G = lb.QuantSpec(bits=4, granularity=lb.PerGroup(8))
W8 = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0), narrow_range=True)


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 5, bias=False)).eval()


def _variants():
    x = torch.randn(8, 2, 8, 8)
    out = []
    for name, w, a, freeze, exclude in [("w4a8", W4G, A8, True, None), ("w8 sym-unsigned act", W8, A8SYM_U, True, None),
                                        ("qat, unfrozen", W4G, A8, False, None), ("weight-only", W4G, None, True, ["8"])]:
        q = lb.quantize(cnn(), weights=w, activations=a, exclude=exclude)
        q[3].weight_quant = type(q[3].weight_quant)(lb.QuantSpec(bits=3, granularity=lb.PerChannel(0)), "mse")
        if a is not None:
            with lb.calibrate(q):
                q(x)
        if not freeze:
            s, z = q[6].weight_quant.qparams(q[6].weight)
            q[6].weight_quant.fix_qparams(s, z)
        out.append((name, lb.freeze(q) if freeze else q, x))
    return out


def _raw_map(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(json.loads(data[8:8 + n])["__metadata__"]["lowbit"])


@pytest.mark.parametrize("case", range(4))
def test_compact_map_reads_back_as_the_full_one(case, tmp_path, monkeypatch):
    name, q, x = _variants()[case]
    lb.save(q, tmp_path / "v2.safetensors")
    monkeypatch.setattr(writer, "compact", lambda full: {**full, "format_version": 1})   # what version 1 wrote
    lb.save(q, tmp_path / "v1.safetensors")
    monkeypatch.undo()
    full, small = _raw_map(tmp_path / "v1.safetensors"), _raw_map(tmp_path / "v2.safetensors")
    assert small["format_version"] == 3   # version 3: version 2 + optional quantized embedding tables
    assert len(json.dumps(small)) < 0.75 * len(json.dumps(full)), name
    expanded = read_quant_map(tmp_path / "v2.safetensors")
    full["format_version"] = 3
    assert expanded == full, name
    for path in ("v1.safetensors", "v2.safetensors"):           # both load, bit-identical
        q2 = lb.load(tmp_path / path, cnn())
        assert torch.equal(q2(x), q(x)), (name, path)


def test_version_1_files_still_load(tmp_path, monkeypatch):
    _, q, x = _variants()[0]
    monkeypatch.setattr(writer, "compact", lambda full: {**full, "format_version": 1})
    lb.save(q, tmp_path / "v1.safetensors")
    assert read_quant_map(tmp_path / "v1.safetensors")["format_version"] == 1
    assert torch.equal(lb.load(tmp_path / "v1.safetensors", cnn())(x), q(x))


def test_damaged_compact_map_is_a_clear_error(tmp_path):
    _, q, _ = _variants()[0]
    lb.save(q, tmp_path / "q.safetensors")
    tensors = safetensors.torch.load_file(str(tmp_path / "q.safetensors"))
    small = _raw_map(tmp_path / "q.safetensors")
    small["implied"] = {"int32": ["nowhere.weight_zero_point"]}
    safetensors.torch.save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"lowbit": json.dumps(small)})
    with pytest.raises(ValueError, match="damaged"):
        lb.load(tmp_path / "bad.safetensors", cnn())
