"""Built-in real data sets, generated or loaded locally (no network), with fixed splits.

``digits``
    scikit-learn's ``load_digits`` (the UCI optical-recognition hand-written digits test set,
    Alpaydin & Kaynak 1998): 1797 images of 8x8 pixels with values 0..16, 10 classes. Split
    80/20 stratified by class with ``sklearn.model_selection.train_test_split(test_size=0.2,
    random_state=0, stratify=y)``: 1437 train / 360 test. Inputs are ``(N, 1, 8, 8)``.
``mnist1d``
    MNIST-1D (Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024), generated
    locally by ``mnist1d.data.make_dataset(get_dataset_args())`` with the standard arguments:
    5000 samples of length 40, seed 42, the package's own split 4000 train / 1000 test (never the
    download path). Inputs are ``(N, 1, 40)``.

Standardisation: ``x_std = (x - mean) / std`` with one scalar ``mean`` and ``std`` computed on the
train split (digits after dividing by 16; MNIST-1D is already standardised over the whole set by
its generator, and the train statistics are applied again, a near-identity). The statistics are
kept in :class:`Dataset` so raw inputs can be mapped the same way.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

__all__ = ["Dataset", "DATASETS", "load_dataset", "calibration_batches", "iterate_batches"]

DATASETS = ("digits", "mnist1d")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set with a fixed split, already standardised, as torch tensors.

    ``x_*`` are float32 of shape ``(N, *input_shape)``; ``y_*`` are int64 class indices.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: float
    std: float
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


def _missing(pkg: str, extra: str = "data") -> ImportError:
    return ImportError(f"the built-in data set needs the {pkg!r} package; install it with "
                       f"`pip install 'lowbit[{extra}]'`")


@functools.lru_cache(maxsize=None)
def _raw_digits() -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise _missing("scikit-learn") from e
    x, y = load_digits(return_X_y=True)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    x = x.astype(np.float32) / 16.0
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@functools.lru_cache(maxsize=None)
def _raw_mnist1d() -> tuple[np.ndarray, ...]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise _missing("mnist1d") from e
    # make_dataset reseeds Python's and NumPy's global generators; leave the caller's state alone.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return (data["x"].astype(np.float32), data["y"].astype(np.int64),
            data["x_test"].astype(np.float32), data["y_test"].astype(np.int64))


def load_dataset(name: str) -> Dataset:
    """The built-in data set ``name`` (one of :data:`DATASETS`), as fresh tensors on the CPU.

    Two calls return equal (but not shared) tensors: the split and the values are fixed.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {DATASETS}; got {type(name).__name__}")
    if name == "digits":
        xtr, ytr, xte, yte = _raw_digits()
        shape = (1, 8, 8)
        source = "sklearn.datasets.load_digits, stratified 80/20 split (random_state=0)"
    elif name == "mnist1d":
        xtr, ytr, xte, yte = _raw_mnist1d()
        shape = (1, 40)
        source = "mnist1d.data.make_dataset(get_dataset_args()): 5000 samples, seed 42, 4000/1000 split"
    else:
        raise ValueError(f"name={name!r} is not a built-in data set; choose one of {DATASETS}")
    mean, std = float(xtr.mean(dtype=np.float64)), float(xtr.std(dtype=np.float64))

    def prep(x: np.ndarray) -> torch.Tensor:
        x = ((x.astype(np.float64) - mean) / std).astype(np.float32)
        return torch.from_numpy(x.reshape(len(x), *shape).copy())

    return Dataset(name=name, x_train=prep(xtr), y_train=torch.from_numpy(ytr.astype(np.int64).copy()),
                   x_test=prep(xte), y_test=torch.from_numpy(yte.astype(np.int64).copy()),
                   num_classes=10, mean=mean, std=std, source=source)


def iterate_batches(x: torch.Tensor, batch_size: int, *, y: torch.Tensor | None = None,
                    order: torch.Tensor | None = None) -> Iterator:
    """Consecutive batches of ``x`` (and ``y``) in ``order`` (default: as stored); the last may be short.

    ``order`` is a 1-D index tensor: a permutation, or a subset of rows (a shard).
    """
    _check_positive("batch_size", batch_size)
    n = len(x) if order is None else len(order)
    for start in range(0, n, batch_size):
        idx = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
        yield x[idx] if y is None else (x[idx], y[idx])


def calibration_batches(dataset: Dataset, num_batches: int = 8, batch_size: int = 64,
                        seed: int = 0) -> list[torch.Tensor]:
    """``num_batches`` input batches drawn without replacement from the **train** split.

    The draw is a seeded permutation, so the same arguments give the same batches; the test split
    is never used, so calibrating on these and evaluating on ``x_test`` is honest. Asking for more
    samples than the split holds gives all of them (the last batch may be short).
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a lowbit.zoo.Dataset (from zoo.load_dataset); got {type(dataset).__name__}")
    _check_positive("num_batches", num_batches)
    _check_positive("batch_size", batch_size)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset.x_train), generator=gen)[: num_batches * batch_size]
    return [dataset.x_train[order[i:i + batch_size]] for i in range(0, len(order), batch_size)]


def _check_positive(arg: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{arg} must be a positive int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{arg} must be >= 1; got {value}")
