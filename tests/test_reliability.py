"""The reliability table of docs/reliability.md: each bad input a user may bring, the error they
see, and that nothing of theirs was changed (their model's state, their file on disk)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.transforms import quantize_with

A8 = lb.QuantSpec(bits=8)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(m, before):
    after = m.state_dict()
    return after.keys() == before.keys() and all(torch.allclose(after[k], before[k], rtol=0, atol=0, equal_nan=True) for k in before)


def _x(n=3):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("row,make,call,error,match", [
    ("non-tensor inputs", _model, lambda m: quantize_with(m, ["a", "b"], activations=A8),
     TypeError, r"batches\[0\] must be a tensor, a tuple .* or a dict"),
    ("NaN weight", lambda: _poisoned(float("nan")), lambda m: lb.quantize(m),
     ValueError, r"module '0': its weight holds 1 NaN/Inf values"),
    ("Inf weight", lambda: _poisoned(float("inf")), lambda m: lb.quantize(m),
     ValueError, r"module '0': its weight holds 1 NaN/Inf values"),
    ("Inf activations", _model, lambda m: quantize_with(m, [torch.full((3, 4), float("inf"))], activations=A8),
     ValueError, r"calibration of 0\.input_quant: .*only non-finite"),
    ("empty calibration", _model, lambda m: quantize_with(m, [], activations=A8),
     ValueError, "batches is empty"),
    ("no quantizable layer", lambda: nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), lambda m: lb.quantize(m),
     ValueError, "no layer was quantized"),
    ("wrong input dtype", _model,
     lambda m: quantize_with(m, [torch.randn(3, 4, dtype=torch.float64)], activations=A8),
     RuntimeError, "dtype"),
])
def test_bad_input_is_refused_and_the_model_is_unchanged(row, make, call, error, match):
    m = make()
    before = _state(m)
    with pytest.raises(error, match=match):
        call(m)
    assert _same(m, before), row


def _poisoned(value):
    m = _model()
    with torch.no_grad():
        m[0].weight[0, 0] = value
    return m


def test_mismatched_checkpoint_names_the_difference_and_keeps_model_like(tmp_path):
    q = lb.quantize(_model())
    lb.freeze(q)
    path = lb.save(q, tmp_path / "q.safetensors")
    other = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    before = _state(other)
    with pytest.raises(ValueError, match=r"model_like does not fit the checkpoint: 0\.weight has shape \[16, 4\]"):
        lb.load(path, other)
    assert _same(other, before)


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "q.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(ValueError, match="q has no quantized layer"):
        lb.save(_model(), path)
    assert path.read_bytes() == b"precious"


def test_unsupported_layers_stay_float_and_are_listed():
    class Odd(nn.Linear):
        def forward(self, x):
            return torch.tanh(super().forward(x))

    m = nn.Sequential(nn.Linear(4, 8), Odd(8, 2))
    before = _state(m)
    q = lb.quantize(m)
    cov = lb.coverage(q)
    assert cov.linear_like_float == ["1"] and "computes another function" in cov.float["1"]
    assert _same(m, before)


def test_interrupted_calibration_leaves_no_quantizer_observing():
    m = _model()
    q = lb.quantize(m, activations=A8)
    with pytest.raises(KeyboardInterrupt):
        with lb.calibrate(q):
            q(_x())
            raise KeyboardInterrupt
    assert not any(getattr(x, "observing", False) for x in q.modules())
    with pytest.raises(ValueError, match="not calibrated"):
        lb.freeze(q)                                   # the half-done calibration is not taken as done
    with lb.calibrate(q):                               # and it can simply be run again
        q(_x())
    lb.freeze(q)
