"""MinMax / MaxAbs / MovingAverage observers against torch.ao.quantization, streaming and merging."""
import pytest
import torch
from torch.ao.quantization import (MinMaxObserver, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
                                   PerChannelMinMaxObserver)

import lowbit
from lowbit import PerChannel, PerGroup, PerToken, QuantSpec, ops
from lowbit.observers import MSE, Entropy, MaxAbs, MinMax, MovingAverage, NotCalibratedError, Percentile

ALL = [MinMax, MaxAbs, MovingAverage, Percentile, MSE, Entropy]


def _batches(n=6, seed=0, shape=(8, 5, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) + i * 0.3 for i in range(n)]


@pytest.mark.parametrize("dtype,signed", [(torch.quint8, False), (torch.qint8, True)])
def test_minmax_affine_equals_torch(dtype, signed):
    spec = QuantSpec(bits=8, signed=signed, symmetric=False)
    ours, ref = MinMax(spec), MinMaxObserver(dtype=dtype, qscheme=torch.per_tensor_affine)
    for b in _batches():
        ours.update(b)
        ref(b)
    s, z = ours.qparams()
    s_ref, z_ref = ref.calculate_qparams()
    assert float(s) == float(s_ref) and int(z) == int(z_ref)


@pytest.mark.parametrize("dtype,signed", [(torch.quint8, False), (torch.qint8, True)])
def test_per_channel_minmax_equals_torch(dtype, signed):
    spec = QuantSpec(bits=8, signed=signed, symmetric=False, granularity=PerChannel(1))
    ours = MinMax(spec)
    ref = PerChannelMinMaxObserver(ch_axis=1, dtype=dtype, qscheme=torch.per_channel_affine)
    for b in _batches():
        ours.update(b)
        ref(b)
    s, z = ours.qparams()
    s_ref, z_ref = ref.calculate_qparams()
    assert torch.equal(s, s_ref.float()) and torch.equal(z.long(), z_ref.long())


def test_symmetric_scale_convention_differs_from_torch_by_127_5_over_127():
    """torch maps max|x| to (qmax - qmin) / 2 = 127.5 steps, lowbit (and ONNX Runtime) to qmax = 127,
    so nothing saturates at +max|x|; the scales differ by exactly that factor."""
    ours, ref = MinMax(QuantSpec(bits=8)), MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    for b in _batches():
        ours.update(b)
        ref(b)
    s, z = ours.qparams()
    s_ref, z_ref = ref.calculate_qparams()
    assert float(s) * 127 == pytest.approx(float(s_ref) * 127.5, rel=1e-6)
    assert int(z) == int(z_ref) == 0


@pytest.mark.parametrize("per_channel", [False, True])
def test_moving_average_equals_torch(per_channel):
    if per_channel:
        spec = QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerChannel(0))
        ref = MovingAveragePerChannelMinMaxObserver(averaging_constant=0.2, ch_axis=0, dtype=torch.quint8,
                                                   qscheme=torch.per_channel_affine)
    else:
        spec = QuantSpec(bits=8, signed=False, symmetric=False)
        ref = MovingAverageMinMaxObserver(averaging_constant=0.2, dtype=torch.quint8)
    ours = MovingAverage(spec, momentum=0.2)
    for b in _batches():
        ours.update(b)
        ref(b)
    s, z = ours.qparams()
    s_ref, z_ref = ref.calculate_qparams()
    assert torch.allclose(s, s_ref.float().reshape(s.shape), rtol=1e-6)
    assert torch.equal(z.long(), z_ref.long().reshape(z.shape))


@pytest.mark.parametrize("cls", [MinMax, MaxAbs])
@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(symmetric=False, signed=False, granularity=PerChannel(-1)),
                                  QuantSpec(bits=4, granularity=PerGroup(8, -1))], ids=str)
def test_streaming_equals_one_pass_over_the_concatenation(cls, spec):
    batches = _batches()
    obs = cls(spec)
    for b in batches:
        obs.update(b)
    s, z = obs.qparams()
    if isinstance(spec.granularity, PerGroup):
        # groups sit at fixed positions of the batch: the reference is the element-wise extreme
        # over batches of each batch's own per-group range
        ranges = [ops.RANGE_METHODS[cls.method](ops.to_rows(b, spec), spec) for b in batches]
        lo = torch.stack([r[0] for r in ranges]).amin(0)
        hi = torch.stack([r[1] for r in ranges]).amax(0)
        s_ref, z_ref = (ops.from_rows(p, batches[0].shape, spec) for p in ops.range_to_qparams(lo, hi, spec))
    else:
        s_ref, z_ref = ops.choose_qparams(torch.cat(batches), spec, observer=cls.method)
        assert torch.equal(cls(spec).update(torch.cat(batches)).qparams()[0], s)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)


@pytest.mark.parametrize("cls", [MinMax, MaxAbs, MovingAverage])
def test_merge_equals_one_observer_over_everything(cls):
    spec = QuantSpec(symmetric=False, signed=False, granularity=PerChannel(1))
    batches = _batches(8)
    a, b, everything = cls(spec), cls(spec), cls(spec)
    for i, x in enumerate(batches):
        (a if i < 5 else b).update(x)
    if cls is MovingAverage:  # not associative: merging is the batch-weighted mean of the averages
        merged = cls(spec).merge(a).merge(b)
        expect = (a.min * 5 + b.min * 3) / 8
        assert torch.allclose(merged.min, expect)
        return
    for x in batches:
        everything.update(x)
    a.merge(b)
    assert torch.equal(a.qparams()[0], everything.qparams()[0])
    assert a.batches == 8


@pytest.mark.parametrize("cls", ALL)
def test_non_finite_values_are_skipped_and_counted(cls):
    spec = QuantSpec(symmetric=False)
    clean = torch.randn(4, 64)
    dirty = clean.clone()
    dirty[0, :3] = float("-inf")
    dirty[1, 5] = float("nan")
    dirty[2, 7] = float("inf")
    a = cls(spec).update(dirty)
    # the same values without the non-finite ones
    b = cls(spec).update(dirty[torch.isfinite(dirty)])
    assert a.nonfinite_count == 5 and b.nonfinite_count == 0
    assert torch.equal(a.qparams()[0], b.qparams()[0])


@pytest.mark.parametrize("cls", ALL)
def test_no_data_asks_for_calibration(cls):
    obs = cls(QuantSpec())
    with pytest.raises(NotCalibratedError, match="run calibration first"):
        obs.qparams()
    with pytest.raises(ValueError):  # NotCalibratedError is also a ValueError
        obs.range()


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("value", [0.0, 2.5, -1.0])
def test_constant_tensor_gets_a_valid_scale(cls, value):
    for spec in (QuantSpec(), QuantSpec(bits=4, signed=False, symmetric=False)):
        x = torch.full((3, 40), value)
        s, z = cls(spec).update(x).update(x).qparams()
        assert float(s) > 0 and bool(torch.isfinite(s))
        err = (ops.fake_quantize(x, spec, s, z) - x).abs().max()
        if cls is MaxAbs and not spec.symmetric:  # [-|c|, |c|] on an affine grid: c lies between codes
            assert float(err) <= float(s) / 2
        else:
            assert float(err) == 0.0


@pytest.mark.parametrize("cls", ALL)
def test_state_dict_round_trip(cls):
    spec = QuantSpec(granularity=PerChannel(1))
    obs = cls(spec)
    for b in _batches(3):
        obs.update(b)
    clone = cls(spec).load_state_dict(obs.state_dict())
    assert torch.equal(clone.qparams()[0], obs.qparams()[0])
    assert all(isinstance(v, torch.Tensor) for v in obs.state_dict().values())
    empty = cls(spec).load_state_dict(cls(spec).state_dict())
    assert not empty.calibrated
    with pytest.raises(ValueError, match="state"):
        cls(spec).load_state_dict({"min": torch.zeros(1)})


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="spec"):
        MinMax("int8")
    with pytest.raises(ValueError, match="PerToken"):
        MinMax(QuantSpec(granularity=PerToken()))
    obs = MinMax(QuantSpec(granularity=PerChannel(1)))
    with pytest.raises(TypeError, match="x"):
        obs.update(torch.arange(5))
    with pytest.raises(TypeError, match="x"):
        obs.update([1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        obs.update(torch.zeros(0, 3))
    obs.update(torch.randn(4, 3))
    with pytest.raises(ValueError, match="first batch"):
        obs.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match="momentum"):
        MovingAverage(QuantSpec(), momentum=0)
    with pytest.raises(TypeError, match="merge"):
        obs.merge(MaxAbs(QuantSpec(granularity=PerChannel(1))))
    with pytest.raises(ValueError, match="merge"):
        obs.merge(MinMax(QuantSpec(bits=4, granularity=PerChannel(1))).update(torch.randn(2, 3)))


def test_inputs_are_not_modified_and_module_shapes_work():
    x = torch.randn(2, 7, 12)  # [batch, tokens, features]: activations, per feature
    keep = x.clone()
    for cls in ALL:
        s, z = cls(QuantSpec(granularity=PerChannel(-1))).update(x).update(x[:1]).qparams()
        assert s.shape == (12,)
    assert torch.equal(x, keep)
    assert lowbit.observers.MinMax is MinMax
