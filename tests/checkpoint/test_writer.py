"""lb.save: what goes into the file, and how big it is."""
import os

import pytest
import safetensors.torch
import torch
from torch import nn

import lowbit as lb
from lowbit.checkpoint import FORMAT_VERSION, read_quant_map, spec_from_dict

A8 = lb.QuantSpec(bits=8, symmetric=False)
W8 = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))
W4G = lb.QuantSpec(bits=4, granularity=lb.PerGroup(8))


def cnn2d(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2),
                      nn.ReLU(), nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 5))
    m[1].running_var.uniform_(0.5, 2)
    return m.eval()


def _quantized(make, weights, activations):
    q = lb.quantize(make(), weights=weights, activations=activations)
    x = torch.randn(16, 2, 8, 8)
    with lb.calibrate(q):
        q(x)
    return q, x


def test_file_holds_packed_codes_and_skips_implied_zero_points(tmp_path):
    q, _ = _quantized(cnn2d, W4G, A8)
    lb.freeze(q)
    lb.save(q, tmp_path / "q.safetensors")
    t = safetensors.torch.load_file(str(tmp_path / "q.safetensors"))
    assert t["6.weight_codes"].dtype == torch.uint8 and t["6.weight_codes"].numel() == 16 * 36 // 2
    assert "6.weight_zero_point" not in t                          # symmetric: all zero, implied
    assert t["6.input_quant.zero_point"].dtype == torch.int8        # stored in the grid's own type
    qmap = read_quant_map(tmp_path / "q.safetensors")
    assert qmap["format_version"] == 3  # int grids only: readable by version-3 lowbit and qmap["fold_bn"] is True
    entry = qmap["layers"]["0"]
    assert entry["frozen"] and entry["weight_shape"] == [6, 2, 3, 3] and entry["float_class"] == "Conv2d"
    assert spec_from_dict(qmap["specs"][entry["weight"]["spec"]]) == W4G and len(qmap["specs"]) == 2   # W4G, A8 once


def test_four_bit_checkpoint_is_at_most_a_seventh_of_the_float_file(tmp_path):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))  # noqa: E731
    m = make()
    safetensors.torch.save_file(m.state_dict(), str(tmp_path / "float.safetensors"))
    torch.save(m.state_dict(), tmp_path / "float.pt")
    float_size = min(os.path.getsize(tmp_path / "float.safetensors"), os.path.getsize(tmp_path / "float.pt"))
    for spec in (lb.QuantSpec(bits=4, granularity=lb.PerGroup(128)), lb.QuantSpec(bits=4, granularity=lb.PerChannel(0))):
        q = lb.freeze(lb.quantize(m, weights=spec))
        lb.save(q, tmp_path / "w4.safetensors")
        assert os.path.getsize(tmp_path / "w4.safetensors") * 7 <= float_size, spec


def test_bad_save_input(tmp_path):
    with pytest.raises(ValueError, match="no quantized layer"):
        lb.save(cnn2d(), tmp_path / "x.safetensors")
    q, x = _quantized(cnn2d, W8, A8)
    with pytest.raises(ValueError, match="does not exist"):
        lb.save(q, tmp_path / "nope" / "x.safetensors")
    with pytest.raises(ValueError, match="after the"):
        with lb.calibrate(q):
            q(x)
            lb.save(q, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_unfrozen_model_is_saved_with_a_warning(tmp_path, caplog):
    q, _ = _quantized(cnn2d, W4G, A8)
    with caplog.at_level("WARNING", logger="lowbit"):
        lb.save(q, tmp_path / "qat.safetensors")
    assert "not frozen" in caplog.text
    qmap = read_quant_map(tmp_path / "qat.safetensors")
    assert not qmap["layers"]["0"]["frozen"]
    t = safetensors.torch.load_file(str(tmp_path / "qat.safetensors"))
    assert t["0.weight"].dtype == torch.float32 and "0.weight_codes" not in t


def test_save_to_a_directory_names_the_argument(tmp_path):
    q = lb.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    lb.freeze(q)
    with pytest.raises(ValueError, match="path .* is a directory; pass the checkpoint file"):
        lb.save(q, tmp_path)
    assert list(tmp_path.iterdir()) == []                             # nothing written
