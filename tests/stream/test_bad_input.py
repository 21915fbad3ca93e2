"""Every bad input of issue 12 gets one clear error naming the file or the fix, and dst never holds
an index (the mark of a complete checkpoint) after a failure."""
import errno
import json
import shutil

import pytest
import torch

import lowbit as lb
from lowbit.stream import output


def _copy(src, tmp_path):
    d = tmp_path / "src"
    shutil.copytree(src, d)
    return d


def _no_index(dst):
    assert not (dst / "lowbit.index.json").exists()


def test_pickle_only_directory(tmp_path, llama_dir):
    src, model = llama_dir
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors.*pytorch_model\.bin.*safe_serialization"):
        lb.quantize_checkpoint(d, tmp_path / "o", lb.recipes.get("w4g128"), progress=False)
    _no_index(tmp_path / "o")


def test_index_names_a_missing_shard(tmp_path, llama_dir):
    d = _copy(llama_dir[0], tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (d / victim).unlink()
    with pytest.raises(ValueError, match=f"names shard '{victim}'.*missing"):
        lb.quantize_checkpoint(d, tmp_path / "o", lb.recipes.get("w4g128"), progress=False)


def test_truncated_shard(tmp_path, llama_dir):
    d = _copy(llama_dir[0], tmp_path)
    victim = sorted(d.glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{victim.name}.*truncated"):
        lb.quantize_checkpoint(d, tmp_path / "o", lb.recipes.get("w4g128"), progress=False)


def test_unknown_architecture(tmp_path, llama_dir):
    d = _copy(llama_dir[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: model_type 'bert' has no block structure lowbit knows"):
        lb.quantize_checkpoint(d, tmp_path / "o", lb.recipes.get("w4g128"), progress=False)


def test_budget_too_small_for_one_block(tmp_path, llama_dir, calib):
    with pytest.raises(ValueError, match=r"memory_budget=.*too small for one block.*pass memory_budget >="):
        lb.quantize_checkpoint(llama_dir[0], tmp_path / "o", lb.recipes.get("w4g128-gptq"), calib,
                               memory_budget=1e5, progress=False)
    _no_index(tmp_path / "o")


def test_full_disk_names_the_file_and_resumes(tmp_path, llama_dir, calib, monkeypatch):
    src = llama_dir[0]
    r = lb.recipes.get("w4g128-gptq")
    real = output.atomic_write
    calls = {"n": 0}

    def full(path, data):
        calls["n"] += 1
        if calls["n"] == 4:   # a few files in: the second unit's shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(output, "atomic_write", full)
    dst = tmp_path / "o"
    with pytest.raises(OSError, match="no space left on the device writing .*lowbit-.*free some space"):
        lb.quantize_checkpoint(src, dst, r, calib, progress=False)
    _no_index(dst)
    assert not list(dst.glob(".*.tmp"))        # no half-written file left behind
    monkeypatch.setattr(output, "atomic_write", real)
    s = lb.quantize_checkpoint(src, dst, r, calib, progress=False)
    assert s["resumed_at"] >= 1
    lb.quantize_checkpoint(src, tmp_path / "ref", r, calib, progress=False)
    from _stream_ckpt import shard_bytes

    assert shard_bytes(dst) == shard_bytes(tmp_path / "ref")


def test_recipe_step_streaming_cannot_run(tmp_path, llama_dir, calib):
    with pytest.raises(ValueError, match="bias_correction.*not supported by streaming.*in memory"):
        lb.quantize_checkpoint(llama_dir[0], tmp_path / "o", lb.recipes.get("w4a8"), calib, progress=False)


def test_calibration_checked(tmp_path, llama_dir):
    r = lb.recipes.get("w4g128-gptq")
    with pytest.raises(ValueError, match="needs calibration data"):
        lb.quantize_checkpoint(llama_dir[0], tmp_path / "o", r, progress=False)
    with pytest.raises(ValueError, match=r"outside \[0, 128\)"):
        lb.quantize_checkpoint(llama_dir[0], tmp_path / "o", r, torch.full((1, 4), 500), progress=False)
    with pytest.raises(TypeError, match="integer tensor of token ids"):
        lb.quantize_checkpoint(llama_dir[0], tmp_path / "o", r, [torch.randn(1, 4)], progress=False)


def test_load_refuses_an_unfinished_directory(tmp_path, llama_dir, calib):
    from _stream_ckpt import meta_model

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "lowbit-progress.json").write_text("{}")
    with pytest.raises(ValueError, match="without lowbit.index.json.*interrupted"):
        lb.load(tmp_path / "o", meta_model(llama_dir[0]))


def test_tied_embeddings_are_refused_clearly(tmp_path, llama_dir):
    d = _copy(llama_dir[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tie_word_embeddings.*in memory"):
        lb.quantize_checkpoint(d, tmp_path / "o", lb.recipes.get("w4g128"), progress=False)
