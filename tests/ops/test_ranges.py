"""choose_qparams accepts every calibration method by name (lowbit.ops.ranges)."""
import numpy as np
import pytest
import torch

from lowbit import PerChannel, QuantSpec, ops


@pytest.mark.parametrize("name", ["minmax", "maxabs", "moving_average", "percentile", "mse", "entropy"])
@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(bits=4, granularity=PerChannel(1), symmetric=False, signed=False)], ids=str)
def test_every_method_gives_valid_onnx_shaped_qparams(name, spec):
    x = torch.randn(16, 6, 50)
    s, z = ops.choose_qparams(x, spec, observer=name)
    assert s.shape == spec.param_shape(x.shape) and z.shape == s.shape
    assert float(s.min()) > 0
    ops.quantize(x, spec, s, z)  # validates the pair


@pytest.mark.parametrize("p", [99.0, 99.9, 50.0, 100.0])
def test_percentile_is_numpys(p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4001, generator=g, dtype=torch.float64)
    spec = QuantSpec(granularity=PerChannel(0))
    lo, hi = ops.RANGE_METHODS["percentile"](x, spec, p=p)
    ref = np.percentile(x.abs().numpy(), p, axis=1)
    assert np.allclose(hi.numpy(), np.minimum(ref, x.max(1).values.numpy()))
    lo, hi = ops.RANGE_METHODS["percentile"](x, spec.replace(symmetric=False), p=p)
    cut = (100 - p) / 2
    assert np.allclose(lo.numpy(), np.percentile(x.numpy(), cut, axis=1))
    assert np.allclose(hi.numpy(), np.percentile(x.numpy(), 100 - cut, axis=1))


def test_moving_average_on_one_tensor_is_minmax():
    x = torch.randn(100)
    for a, b in zip(ops.choose_qparams(x, QuantSpec(symmetric=False), observer="moving_average"),
                    ops.choose_qparams(x, QuantSpec(symmetric=False), observer="minmax")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p,err", [(0, ValueError), (101, ValueError), ("99", TypeError)])
def test_bad_percentile_is_named(p, err):
    with pytest.raises(err, match="p must"):
        ops.choose_qparams(torch.randn(10), QuantSpec(), observer="percentile", p=p)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="entropy"):
        ops.choose_qparams(torch.randn(10), QuantSpec(), observer="kl")
