"""lowbit.zoo.cache: location from the environment, keys that change with the recipe, atomic writes."""
import threading
import time

import pytest
import torch

from lowbit.zoo import cache


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "zoo"
    monkeypatch.delenv("LOWBIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "lowbit" / "zoo"


def test_key_depends_on_every_part_and_on_torch_major(monkeypatch):
    k = cache.cache_key(arch="A", config={"epochs": 3})
    assert k == cache.cache_key(config={"epochs": 3}, arch="A")      # order of parts is irrelevant
    assert k != cache.cache_key(arch="A", config={"epochs": 4})
    assert k != cache.cache_key(arch="B", config={"epochs": 3})
    monkeypatch.setattr(torch, "__version__", "99.0.0")
    assert k != cache.cache_key(arch="A", config={"epochs": 3})
    assert len(k) == 16 and int(k, 16) >= 0


def test_atomic_save_roundtrip_and_no_half_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "m.pt"
    good = {"state_dict": {"w": torch.arange(4.0)}, "acc": 0.5}
    cache.atomic_save(good, path)
    assert torch.equal(cache.load_entry(path)["state_dict"]["w"], torch.arange(4.0))

    real_save = torch.save

    def crash(obj, f):          # write part of the file, then die
        real_save(obj, f)
        f.truncate(10)
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.atomic_save({"state_dict": {"w": torch.zeros(4)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(cache.load_entry(path)["state_dict"]["w"], torch.arange(4.0))   # the good file survives
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]                  # no temp file left


def test_unreadable_or_foreign_files_read_as_missing(tmp_path):
    assert cache.load_entry(tmp_path / "absent.pt") is None
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert cache.load_entry(tmp_path / "junk.pt") is None
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    assert cache.load_entry(tmp_path / "foreign.pt") is None


def test_file_lock_is_exclusive(tmp_path):
    pytest.importorskip("fcntl")
    lock = tmp_path / "x.lock"
    events = []

    def other():
        with cache.file_lock(lock):
            events.append("other")

    with cache.file_lock(lock):
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.2)
        events.append("holder")
    t.join(5)
    assert events == ["holder", "other"]
