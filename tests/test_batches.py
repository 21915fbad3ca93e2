import pytest
import torch
from torch import nn

from lowbit import batches as B


class Kw(nn.Module):
    def forward(self, a, b=None, scale=1.0):
        return (a + (0 if b is None else b)) * scale


def test_call_unpacks_tensor_tuple_and_dict():
    m = Kw()
    a, b = torch.randn(3), torch.randn(3)
    assert torch.equal(B.call(m, a), a)
    assert torch.equal(B.call(m, (a, b)), a + b)
    assert torch.equal(B.call(m, [a, b]), a + b)
    assert torch.equal(B.call(m, {"a": a, "b": b, "scale": 2.0}), (a + b) * 2.0)


def test_as_batches_materializes_a_generator_once():
    gen = (torch.full((2,), float(i)) for i in range(3))
    out = B.as_batches(gen)
    assert [float(x[0]) for x in out] == [0.0, 1.0, 2.0]
    assert [float(x[0]) for x in out] == [0.0, 1.0, 2.0]   # a second pass sees the same batches


def test_bad_batches_get_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        B.as_batches([])
    with pytest.raises(ValueError, match="empty"):
        B.as_batches(iter(()))
    with pytest.raises(TypeError, match=r"\[x\]"):
        B.as_batches(torch.randn(4, 3))
    with pytest.raises(TypeError, match=r"batches\[1\]"):
        B.as_batches([torch.randn(2), 3.0])
    with pytest.raises(TypeError, match="keys must be strings"):
        B.as_batches([{0: torch.randn(2)}])
    with pytest.raises(TypeError, match="iterable"):
        B.as_batches(5)


def test_to_device_moves_every_tensor_and_keeps_the_rest():
    a = torch.randn(2)
    out = B.to_device({"a": a, "n": 3}, "cpu")
    assert torch.equal(out["a"], a) and out["n"] == 3
    assert B.to_device(a, None) is a
    assert B.model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert B.model_device(nn.ReLU()) is None
