"""lowbit.demo.metrics against independent oracles (scipy's KL, naive counting, real files)."""
import os

import pytest
import safetensors.torch
import torch
from torch import nn

from lowbit.demo import fidelity, float_checkpoint_bytes, torch_threads

stats = pytest.importorskip("scipy.stats")


def test_fidelity_matches_scipy_and_counting():
    g = torch.Generator().manual_seed(0)
    zf = torch.randn(50, 10, generator=g) * 3
    zq = zf + 0.5 * torch.randn(50, 10, generator=g)
    y = torch.randint(0, 10, (50,), generator=g)
    f = fidelity(zf, zq, y)
    pf, pq = zf.double().softmax(1).numpy(), zq.double().softmax(1).numpy()
    ref = sum(stats.entropy(pf[i], pq[i]) for i in range(50)) / 50
    assert f.kl == pytest.approx(ref, rel=1e-9)
    assert f.agreement == sum(int(a == b) for a, b in zip(zf.argmax(1), zq.argmax(1))) / 50
    assert f.accuracy == sum(int(a == b) for a, b in zip(zq.argmax(1), y)) / 50
    assert f.float_accuracy == sum(int(a == b) for a, b in zip(zf.argmax(1), y)) / 50
    same = fidelity(zf, zf.clone())
    assert same.kl == 0.0 and same.agreement == 1.0 and same.accuracy is None


def test_fidelity_rejects_mismatched_logits():
    with pytest.raises(ValueError, match="logits"):
        fidelity(torch.zeros(3, 4), torch.zeros(3, 5))


def test_float_size_is_the_file_safetensors_writes(tmp_path):
    m = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5))
    path = tmp_path / "f.safetensors"
    safetensors.torch.save_file(m.state_dict(), str(path))
    assert float_checkpoint_bytes(m) == os.path.getsize(path)


def test_threads_are_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        with torch_threads(0):
            pass
