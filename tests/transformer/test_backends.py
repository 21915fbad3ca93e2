"""Execution backends: the registry, the built-in torch/integer paths and the choice of the fastest."""
import time

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.transformer import backends as B


@pytest.fixture
def frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    batches = [torch.randn(4, 16) for _ in range(3)]
    q = lb.quantize(model, activations=lb.QuantSpec(bits=8, symmetric=False))
    with lb.calibrate(q):
        for b in batches:
            q(b)
    return lb.freeze(q), batches


@pytest.fixture
def registry():
    saved = dict(B.BACKENDS)
    yield B.BACKENDS
    B.BACKENDS.clear()
    B.BACKENDS.update(saved)


def test_builtin_backends_compute_the_quantized_model(frozen):
    q, batches = frozen
    assert {"torch", "integer"} <= set(B.available()) and "integer" not in B.candidates()
    assert B.build("torch", q, batches[0]) is q
    qi = B.build("integer", q, batches[0])
    with torch.no_grad():
        for b in batches:
            # integer arithmetic agrees with the fake-quantized model to within an output step or so
            torch.testing.assert_close(qi(b), q(b), rtol=0, atol=0.05)


def test_fastest_picks_the_quicker_backend_and_skips_broken_ones(frozen, registry):
    q, batches = frozen

    class Slow(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            time.sleep(0.02)
            return self.inner(x)

    def broken(q, example, threads):
        raise NotImplementedError("cannot export this")

    B.register_backend(B.Backend("slow", "sleeps", lambda q, ex, th: Slow(q)))
    B.register_backend(B.Backend("broken", "fails", broken))
    name, module, seconds = B.fastest(q, batches, ["slow", "torch", "broken"])
    assert name == "torch" and module is q
    assert seconds["broken"] is None and seconds["slow"] > 3 * 0.02 > seconds["torch"]


def test_unavailable_and_unknown_backends(frozen, registry):
    q, batches = frozen

    def missing():
        raise ImportError("no such runtime")

    B.register_backend(B.Backend("absent", "needs a package", lambda q, ex, th: q, missing))
    assert "absent" not in B.available()
    with pytest.raises(ValueError, match="not available"):
        B.build("absent", q, batches[0])
    with pytest.raises(ValueError, match="backend must be one of"):
        B.build("tpu", q, batches[0])
    with pytest.raises(TypeError):
        B.register_backend("torch")
    with pytest.raises(ValueError, match="could run"):
        B.fastest(q, batches, ["absent"])


def test_preferred_takes_the_first_backend_that_builds(frozen, registry):
    q, batches = frozen

    def broken(q, example, threads):
        raise NotImplementedError("cannot export this")

    B.register_backend(B.Backend("broken", "fails", broken))
    name, module, failed = B.preferred(q, batches[0], order=("absent-name", "broken", "torch", "integer"))
    assert name == "torch" and module is q and set(failed) == {"broken"} and "cannot export" in failed["broken"]
    with pytest.raises(ValueError, match="could run"):
        B.preferred(q, batches[0], order=("broken",))
    assert B.AUTO_ORDER[-1] == "torch"      # the reference path is the last resort
