"""lowbit.zoo.datasets: shapes, fixed splits checked against the source packages, determinism."""
import random

import numpy as np
import pytest
import torch

from lowbit import zoo
from lowbit.zoo import datasets as zds

pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")


@pytest.mark.parametrize("name,n_train,n_test,shape", [
    ("digits", 1437, 360, (1, 8, 8)),
    ("mnist1d", 4000, 1000, (1, 40)),
])
def test_documented_shapes_and_split(name, n_train, n_test, shape):
    d = zoo.load_dataset(name)
    assert d.name == name and d.num_classes == 10
    assert tuple(d.x_train.shape) == (n_train, *shape) and tuple(d.x_test.shape) == (n_test, *shape)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.y_train.shape == (n_train,) and d.y_test.shape == (n_test,)
    for y in (d.y_train, d.y_test):      # every class on both sides of the split
        assert set(y.tolist()) == set(range(10))
    # standardised on the train split
    assert abs(d.x_train.double().mean().item()) < 1e-4
    assert abs(d.x_train.double().std(unbiased=False).item() - 1) < 1e-4


def test_two_loads_are_equal_and_not_shared():
    a, b = zoo.load_dataset("mnist1d"), zoo.load_dataset("mnist1d")
    for f in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    a.x_train.zero_()
    assert not torch.equal(a.x_train, b.x_train)
    assert torch.equal(zoo.load_dataset("mnist1d").x_train, b.x_train)


def test_digits_split_matches_sklearn():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    d = zoo.load_dataset("digits")
    assert torch.equal(d.y_train, torch.as_tensor(ytr)) and torch.equal(d.y_test, torch.as_tensor(yte))
    mu, sd = xtr.mean(), xtr.std()
    np.testing.assert_allclose(d.x_test.reshape(360, 64).numpy(), (xte - mu) / sd, atol=1e-5)


def test_mnist1d_is_the_standard_generated_set():
    from mnist1d.data import get_dataset_args, make_dataset
    d = zoo.load_dataset("mnist1d")
    ref = make_dataset(get_dataset_args())          # the package's own, default args (seed 42)
    assert torch.equal(d.y_test, torch.as_tensor(ref["y_test"]))
    assert torch.equal(d.y_train, torch.as_tensor(ref["y"]))
    np.testing.assert_allclose(d.x_test[:, 0].numpy(), (ref["x_test"] - d.mean) / d.std, atol=1e-5)


def test_generation_leaves_the_global_rngs_alone(monkeypatch):
    import mnist1d.data

    def reseeding_make_dataset(args):               # what the real generator does to global state
        random.seed(args.seed); np.random.seed(args.seed)
        z = np.zeros((4, 40)); y = np.arange(4)
        return {"x": z, "y": y, "x_test": z, "y_test": y}

    monkeypatch.setattr(mnist1d.data, "make_dataset", reseeding_make_dataset)
    zds._raw_mnist1d.cache_clear()
    random.seed(123); np.random.seed(123)
    py_before, np_before = random.random(), np.random.rand()
    random.seed(123); np.random.seed(123)
    try:
        zds._raw_mnist1d()
    finally:
        zds._raw_mnist1d.cache_clear()               # the next load generates the real data again
    assert random.random() == py_before and np.random.rand() == np_before


def test_calibration_batches_come_from_train_split_deterministically():
    d = zoo.load_dataset("digits")
    b1 = zoo.calibration_batches(d, num_batches=4, batch_size=32, seed=3)
    b2 = zoo.calibration_batches(d, num_batches=4, batch_size=32, seed=3)
    assert len(b1) == 4 and all(b.shape == (32, 1, 8, 8) for b in b1)
    assert all(torch.equal(u, v) for u, v in zip(b1, b2))
    rows = torch.cat(b1).reshape(128, -1)
    train = d.x_train.reshape(len(d.x_train), -1)
    assert (rows[:, None, :] == train[None]).all(-1).any(1).all()     # each calibration row is a train row
    other = zoo.calibration_batches(d, num_batches=4, batch_size=32, seed=4)
    assert not torch.equal(torch.cat(other), torch.cat(b1))
    # without replacement: asking for more than the split holds gives each train row exactly once
    everything = torch.cat(zoo.calibration_batches(d, num_batches=1000, batch_size=500)).reshape(-1, 64)
    rows_a, counts_a = np.unique(everything.numpy(), axis=0, return_counts=True)
    rows_b, counts_b = np.unique(train.numpy(), axis=0, return_counts=True)
    assert np.array_equal(rows_a, rows_b) and np.array_equal(counts_a, counts_b)


def test_bad_input():
    with pytest.raises(ValueError, match="digits"):
        zoo.load_dataset("cifar10")
    with pytest.raises(TypeError, match="name"):
        zoo.load_dataset(3)
    d = zoo.load_dataset("digits")
    with pytest.raises(ValueError, match="batch_size"):
        zoo.calibration_batches(d, batch_size=0)
    with pytest.raises(TypeError, match="dataset"):
        zoo.calibration_batches(d.x_train)
