"""A failed or interrupted save never replaces a good file."""
import os

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.checkpoint import atomic, writer
from lowbit.checkpoint.atomic import atomic_write


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


def _frozen(bits):
    q = lb.quantize(_model(), weights=lb.QuantSpec(bits=bits, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(bits=8, symmetric=False))
    with lb.calibrate(q):
        q(torch.randn(8, 2, 8, 8))
    return lb.freeze(q)


def test_atomic_write_replaces_and_keeps_the_usual_permissions(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")
    atomic_write(path, b"new contents")
    assert path.read_bytes() == b"new contents" and os.listdir(tmp_path) == ["f.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)        # as open(path, "wb") would make it
    with pytest.raises(ValueError, match="does not exist"):
        atomic_write(tmp_path / "no" / "f.bin", b"x")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    good_model = _frozen(8)
    path = tmp_path / "good.safetensors"
    lb.save(good_model, path)
    good = path.read_bytes()
    other = _frozen(4)

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(writer, "_serialize", boom)                 # the serializer fails
    with pytest.raises(RuntimeError, match="disk on fire"):
        lb.save(other, path)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["good.safetensors"]
    monkeypatch.undo()

    class Crash(BaseException):                                    # e.g. KeyboardInterrupt, or the process dying
        pass

    def crash_after_the_bytes_are_written(fd):
        assert os.fstat(fd).st_size > 0                              # the temporary file holds the new data
        raise Crash

    monkeypatch.setattr(atomic.os, "fsync", crash_after_the_bytes_are_written)
    with pytest.raises(Crash):
        lb.save(other, path)
    monkeypatch.undo()
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["good.safetensors"]
    x = torch.randn(2, 2, 8, 8)
    assert torch.equal(lb.load(path, _model(seed=1))(x), good_model(x))
