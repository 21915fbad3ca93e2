"""Specs as JSON, and reading the header: truncated and foreign files are clear errors."""
import json
import os

import pytest
import safetensors.torch
import torch
from torch import nn

import lowbit as lb
from lowbit.checkpoint import FORMAT_VERSION, read_quant_map, spec_from_dict, spec_to_dict


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.fixture
def saved(tmp_path):
    q = lb.quantize(_model(), activations=lb.QuantSpec(bits=8, symmetric=False))
    with lb.calibrate(q):
        q(torch.randn(4, 8))
    path = tmp_path / "good.safetensors"
    lb.save(lb.freeze(q), path)
    return path


@pytest.mark.parametrize("spec", [
    lb.QuantSpec(), lb.QuantSpec(bits=4, signed=False, symmetric=False, granularity=lb.PerChannel(1)),
    lb.QuantSpec(bits=3, granularity=lb.PerGroup(32, axis=0), rounding="stochastic", narrow_range=True),
    lb.QuantSpec(bits=8, dynamic=True, granularity=lb.PerToken()),
])
def test_specs_survive_json(spec):
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec


def test_unknown_granularity_is_an_error():
    d = spec_to_dict(lb.QuantSpec())
    d["granularity"] = {"type": "PerBlock2D"}
    with pytest.raises(ValueError, match="unknown granularity"):
        spec_from_dict(d)


@pytest.mark.parametrize("cut", [0, 5, 8, 40, 0.5, -1])
def test_truncated_file_is_a_clear_error(saved, tmp_path, cut):
    data = saved.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (len(data) + cut if cut < 0 else cut)
    (tmp_path / "cut.safetensors").write_bytes(data[:n])
    with pytest.raises(ValueError, match="truncated|too short"):
        lb.load(tmp_path / "cut.safetensors", _model())


def test_foreign_files_are_clear_errors(tmp_path):
    m = _model()
    torch.save(m.state_dict(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="not a safetensors file"):
        lb.load(tmp_path / "m.pt", m)
    (tmp_path / "junk.bin").write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="not a"):
        lb.load(tmp_path / "junk.bin", m)
    (tmp_path / "text.json").write_bytes(b"{\"a\": 1}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        lb.load(tmp_path / "text.json", m)
    safetensors.torch.save_file(m.state_dict(), str(tmp_path / "float.safetensors"))
    with pytest.raises(ValueError, match="not a lowbit checkpoint"):
        lb.load(tmp_path / "float.safetensors", m)
    with pytest.raises(FileNotFoundError):
        lb.load(tmp_path / "missing.safetensors", m)


def test_a_newer_format_version_asks_for_an_upgrade(saved, tmp_path):
    qmap = read_quant_map(saved)
    assert qmap["format_version"] == 3  # int grids only (FORMAT_VERSION 4 is for number formats)
    tensors = safetensors.torch.load_file(str(saved))
    qmap["format_version"] = FORMAT_VERSION + 1
    safetensors.torch.save_file(tensors, str(tmp_path / "new.safetensors"), metadata={"lowbit": json.dumps(qmap)})
    with pytest.raises(ValueError, match="upgrade lowbit"):
        lb.load(tmp_path / "new.safetensors", _model())
