"""A Hugging Face model directory (``save_pretrained``: config.json + model.safetensors) as ``--model``
of ``lowbit quantize``, ``analyze`` and ``export``; bad directories fail with the reason, writing nothing.

Oracles: the model's own module tree (every layer computing ``x @ W^T`` is quantized), transformers'
own loader (the float model the checkpoint is loaded onto), the float model's logits (cosine of the
quantized model's), and ONNX Runtime (``lowbit export`` compares it with lowbit itself).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import lowbit as lb
from _archs import VOCAB, build
from lowbit.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    m = build("gpt2", tied=True)
    m.save_pretrained(root / "gpt2")                 # safetensors by default
    ids = torch.randint(3, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")
    return root


def _linear_like(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


def test_quantize_a_model_directory(hf_dir, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    rc = main(["quantize", "--model", str(hf_dir / "gpt2"), "--recipe", "w8a8", "--calibration",
               str(hf_dir / "ids.pt"), "--batch-size", "8", "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf_dir / "gpt2").eval()
    assert sorted(result["quantized"]) == _linear_like(ref)
    assert result["coverage"]["linear_like_float"] == []
    q = lb.load(out, transformers.GPT2LMHeadModel.from_pretrained(hf_dir / "gpt2").eval())
    x = torch.load(hf_dir / "ids.pt")[:4]
    with torch.no_grad():
        assert _cos(q(x).logits, ref(x).logits) > 0.99


def test_analyze_a_model_directory(hf_dir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["analyze", "--model", str(hf_dir / "gpt2"), "--calibration", str(hf_dir / "ids.pt"),
               "--batch-size", "8", "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf_dir / "gpt2")
    assert sorted(r["layer"] for r in report["layers"]) == _linear_like(ref)
    assert report["bound_unavailable"]["why"]                # a causal LM: per-token logits, and it says so
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")


@pytest.mark.slow
def test_export_a_model_directory(hf_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    rc = main(["export", "--model", str(hf_dir / "gpt2"), "--calibration", str(hf_dir / "ids.pt"),
               "--batch-size", "8", "--out", str(out), "--json"])
    err = capsys.readouterr()
    assert rc == 0, err.err
    result = json.loads(err.out)
    assert result["check"]["rel_l2"] < 1e-3 and out.exists()


def test_bad_directories_fail_with_the_reason(hf_dir, tmp_path, capsys):
    calib = str(hf_dir / "ids.pt")
    out = tmp_path / "q.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    pickled = tmp_path / "pickled"
    shutil.copytree(hf_dir / "gpt2", pickled)
    sd = {k: v for k, v in transformers.GPT2LMHeadModel.from_pretrained(hf_dir / "gpt2").state_dict().items()}
    (pickled / "model.safetensors").unlink()
    torch.save(sd, pickled / "pytorch_model.bin")
    custom = tmp_path / "custom"
    shutil.copytree(hf_dir / "gpt2", custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["architectures"] = ["MyOwnGPT"]
    (custom / "config.json").write_text(json.dumps(cfg))
    cases = [(empty, "no config.json"), (pickled, "only pickled weights"), (custom, "'MyOwnGPT', which transformers"),
             (tmp_path / "missing" / "dir", "is not a directory")]
    for d, message in cases:
        for cmd in (["quantize", "--out", str(out)], ["analyze", "--out", str(tmp_path / "r")]):
            assert main(cmd + ["--model", str(d), "--calibration", calib]) == 2
            assert message in capsys.readouterr().err, (d, cmd[0])
    assert main(["quantize", "--model", str(hf_dir / "gpt2"), "--state-dict", calib, "--out", str(out)]) == 2
    assert "a model directory brings its weights" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "r").exists()
    assert main(["train", "--model", str(hf_dir / "gpt2")]) == 2
    assert "a Hugging Face model directory is quantized, analysed and exported" in capsys.readouterr().err
