"""lowbit.zoo.catalog: the trained built-in CNNs reach the literature accuracies; cached, reused, rebuilt.

Thresholds come from the literature, not from lowbit: the MNIST-1D paper (Greydanus & Kobak 2024)
reports about 94% test accuracy for a small CNN; small CNNs on scikit-learn digits reach about 98%
(torch's own int8 measurements in the PTQ issue were on a 98.06% model).
"""
import shutil

import pytest
import torch

from lowbit import zoo
from lowbit.zoo import catalog

pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")

LITERATURE = {"digits": 0.98, "mnist1d": 0.94}


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_trained_model_reaches_literature_accuracy(name):
    model, data = zoo.get(name)                  # trains once (seconds), then from the on-disk cache
    assert not model.training
    with torch.no_grad():
        pred = model(data.x_test).argmax(dim=1)
    acc = (pred == data.y_test).double().mean().item()
    assert acc >= LITERATURE[name], f"{name}: test accuracy {acc:.4f} < {LITERATURE[name]}"
    assert catalog.cache_path(name).exists()
    card = zoo.card(name)
    assert card.test_accuracy == pytest.approx(acc)
    assert card.params == sum(p.numel() for p in model.parameters())
    assert card.param_bytes == 4 * card.params and card.state_bytes > card.param_bytes


def test_returned_model_is_the_callers_copy():
    a = zoo.load_model("digits")
    with torch.no_grad():
        a.classifier.weight.zero_()
    b = zoo.load_model("digits")
    assert b.classifier.weight.abs().sum() > 0
    untrained = zoo.load_model("digits", trained=False)
    assert not torch.equal(untrained.classifier.weight, b.classifier.weight)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """A 'tiny' registry entry (digits CNN, 1 epoch) and an empty cache directory."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    entry = catalog._Entry(lambda: zoo.DigitsCNN(width=4), "digits", zoo.TrainConfig(epochs=1, batch_size=256))
    monkeypatch.setitem(catalog._REGISTRY, "tiny", entry)
    calls = []
    real = catalog._train_and_save
    monkeypatch.setattr(catalog, "_train_and_save", lambda name, path: calls.append(name) or real(name, path))
    return calls


def test_second_load_does_not_retrain(tiny, tmp_path):
    m1 = zoo.load_model("tiny")
    path = catalog.cache_path("tiny")
    assert tiny == ["tiny"] and path.exists() and path.parent == tmp_path / "zoo"
    m2 = zoo.load_model("tiny")
    assert tiny == ["tiny"]                                       # not trained again
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    assert sorted(p.name for p in path.parent.glob("*.pt")) == [path.name]  # no leftovers
    zoo.load_model("tiny", retrain=True)
    assert tiny == ["tiny", "tiny"]


def test_corrupt_cache_file_is_rebuilt(tiny):
    path = catalog.cache_path("tiny")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00truncated")
    model = zoo.load_model("tiny")
    assert tiny == ["tiny"]
    assert torch.load(path, weights_only=True)["name"] == "tiny"
    assert model.classifier.weight.abs().sum() > 0


def test_cache_key_changes_with_recipe(tiny, monkeypatch):
    before = catalog.cache_path("tiny")
    e = catalog._REGISTRY["tiny"]
    monkeypatch.setitem(catalog._REGISTRY, "tiny", catalog._Entry(e.factory, e.dataset, zoo.TrainConfig(epochs=2)))
    assert catalog.cache_path("tiny") != before
    monkeypatch.setitem(catalog._REGISTRY, "tiny", catalog._Entry(lambda: zoo.DigitsCNN(width=5), e.dataset, e.config))
    assert catalog.cache_path("tiny") != before


def test_cached_real_model_loads_from_a_copied_cache(monkeypatch, tmp_path):
    src = catalog.cache_path("mnist1d")
    if not src.exists():
        zoo.load_model("mnist1d")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    dst = catalog.cache_path("mnist1d")
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    monkeypatch.setattr(catalog, "train", lambda *a, **k: pytest.fail("must not train: the cache has it"))
    zoo.load_model("mnist1d")


def test_bad_names():
    with pytest.raises(ValueError, match="digits"):
        zoo.load_model("resnet50")
    with pytest.raises(ValueError, match="minilm"):
        zoo.load_model("minilm")
    with pytest.raises(TypeError, match="name"):
        zoo.build_model(None)
