"""The built-in models by name: build, train once, cache, load.

``load_model(name)`` returns the trained model in eval mode, training it on first use (a few
seconds on 2 cores) and loading it from the cache (:mod:`lowbit.zoo.cache`) afterwards. The weights
are a pure function of the recipe below, the data and the torch version: two trainings give the
same bits on the same machine and thread count. The cache key covers the architecture, the recipe,
the data (a SHA-256 of its tensors) and the torch major version.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .cache import atomic_save, cache_dir, cache_key, file_lock, load_entry
from .datasets import Dataset, load_dataset
from .models import DigitsCNN, MNIST1DCNN
from .training import TrainConfig, evaluate, train

__all__ = ["MODELS", "NAMES", "ModelCard", "build_model", "load_model", "get", "card", "cache_path", "recipe"]

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the training loop changes in a way the config does not show


@dataclass(frozen=True)
class _Entry:
    factory: Callable[[], nn.Module]
    dataset: str
    config: TrainConfig
    init_seed: int = 0


_REGISTRY: dict[str, _Entry] = {
    "digits": _Entry(lambda: DigitsCNN(width=16), "digits",
                     TrainConfig(epochs=20, batch_size=64, lr=1e-2, weight_decay=1e-4)),
    "mnist1d": _Entry(lambda: MNIST1DCNN(width=32), "mnist1d",
                      TrainConfig(epochs=24, batch_size=64, lr=1e-2, weight_decay=1e-4)),
}
MODELS = tuple(_REGISTRY)                 # the trainable CNNs
NAMES = MODELS + ("minilm",)              # everything `get` knows


@dataclass(frozen=True)
class ModelCard:
    """What a trained built-in model is: architecture, size, float accuracy, training cost."""

    name: str
    dataset: str
    architecture: str
    params: int
    param_bytes: int          # float32 parameters
    state_bytes: int          # the whole state dict (parameters + BatchNorm buffers)
    test_accuracy: float
    train_seconds: float
    config: dict[str, Any]
    cache_path: str


def _entry(name: str) -> _Entry:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {MODELS}; got {type(name).__name__}")
    if name not in _REGISTRY:
        hint = " (minilm is a transformer: use zoo.get('minilm') or zoo.load_minilm())" if name == "minilm" else ""
        raise ValueError(f"name={name!r} is not a built-in CNN; choose one of {MODELS}{hint}")
    return _REGISTRY[name]


def recipe(name: str) -> TrainConfig:
    """The training recipe of built-in model ``name``."""
    return _entry(name).config


def build_model(name: str) -> nn.Module:
    """A freshly initialised (untrained) built-in model, seeded, without touching the global RNG."""
    e = _entry(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(e.init_seed)
        return e.factory()


def cache_path(name: str):
    """Where the trained weights of ``name`` live (exists once trained)."""
    e = _entry(name)
    model = build_model(name)
    data = load_dataset(e.dataset)
    key = cache_key(name=name, architecture=f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}",
                    dataset=data.source, data_sha256=_fingerprint(data), config=e.config.as_dict(),
                    init_seed=e.init_seed, recipe=RECIPE_VERSION)
    return cache_dir() / f"{name}-{key}.pt"


def _fingerprint(data: Dataset) -> str:
    """SHA-256 of the data set's tensors: a new generator version that changes the data retrains."""
    h = hashlib.sha256()
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _train_and_save(name: str, path) -> dict:
    e = _entry(name)
    model = build_model(name)
    data = load_dataset(e.dataset)
    log.info("training built-in model %r (%d epochs); cached afterwards at %s", name, e.config.epochs, path)
    t0 = time.perf_counter()
    train(model, data, e.config, eval_test=False)
    seconds = time.perf_counter() - t0
    acc = evaluate(model, data.x_test, data.y_test)
    log.info("trained %r in %.1fs: test accuracy %.4f", name, seconds, acc)
    entry = {"state_dict": model.state_dict(), "name": name, "test_accuracy": acc, "train_seconds": seconds,
             "config": e.config.as_dict(), "torch": str(torch.__version__)}
    atomic_save(entry, path)
    return entry


def _trained_entry(name: str, retrain: bool = False) -> tuple[dict, Any]:
    path = cache_path(name)
    entry = None if retrain else load_entry(path)
    if entry is None:
        with file_lock(path.with_name(path.name + ".lock")):
            entry = None if retrain else load_entry(path)  # another process may have just trained it
            if entry is None:
                entry = _train_and_save(name, path)
    return entry, path


def load_model(name: str, trained: bool = True, *, retrain: bool = False) -> nn.Module:
    """Built-in model ``name`` in eval mode: trained (from the cache, training once if needed) or fresh.

    ``retrain=True`` ignores the cached file and trains again (replacing it atomically).
    The returned model is the caller's own copy; changing it never changes the cache.
    """
    model = build_model(name)
    if trained:
        entry, path = _trained_entry(name, retrain)
        try:
            model.load_state_dict(entry["state_dict"])
        except RuntimeError:
            log.warning("cache file %s does not fit %r; retraining", path, name)
            entry, _ = _trained_entry(name, retrain=True)
            model.load_state_dict(entry["state_dict"])
    return model.eval()


def card(name: str) -> ModelCard:
    """The :class:`ModelCard` of trained built-in model ``name`` (trains it once if not cached)."""
    entry, path = _trained_entry(name)
    model = build_model(name)
    params = sum(p.numel() for p in model.parameters())
    return ModelCard(
        name=name, dataset=_entry(name).dataset, architecture=repr(model), params=params,
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        state_bytes=sum(t.numel() * t.element_size() for t in entry["state_dict"].values()),
        test_accuracy=float(entry["test_accuracy"]), train_seconds=float(entry["train_seconds"]),
        config=dict(entry["config"]), cache_path=str(path))


def get(name: str) -> tuple[nn.Module, Any]:
    """``(model, data)`` for a built-in name: a trained CNN and its :class:`Dataset`, or, for
    ``"minilm"``, the float SentenceTransformer and the built-in sentence list."""
    if name == "minilm":
        from .minilm import load_minilm
        from .corpus import sentences
        return load_minilm(), sentences()
    model = load_model(name)
    return model, load_dataset(_entry(name).dataset)


def dataset_of(name: str) -> Dataset:
    """The data set built-in model ``name`` is trained on."""
    return load_dataset(_entry(name).dataset)
