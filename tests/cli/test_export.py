"""``lowbit export``: quantize a built-in model with a recipe, export, check with ONNX Runtime."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lowbit import recipes, zoo
from lowbit.cli import main

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_export_digits_json(tmp_path, capsys):
    out = tmp_path / "digits.onnx"
    assert main(["export", "--model", "digits", "--recipe", "w4g32", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(out) and out.stat().st_size == result["size_bytes"]
    assert result["int4"] == result["layers"] and len(result["layers"]) == 4
    # recompute the check independently: the same recipe on the same model, run by ONNX Runtime
    model, ds = zoo.get("digits")
    q = recipes.get("w4g32").apply(model)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    session_exact = ort.InferenceSession(
        str(out), _exact_options(), providers=["CPUExecutionProvider"])
    y = session_exact.run(None, {session.get_inputs()[0].name: ds.x_test.numpy()})[0]
    with torch.no_grad():
        ref = q(ds.x_test).numpy()
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert result["check"]["rel_l2"] == pytest.approx(rel, rel=1e-3, abs=1e-7)
    assert result["check"]["rel_l2"] < 1e-5 < result["check"]["lowbit_vs_float_rel_l2"]


def _exact_options():
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return so


def test_export_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    assert main(["export", "--model", "digits", "--recipe", "nope", "--out", str(tmp_path / "a.onnx")]) == 2
    assert "recipe" in capsys.readouterr().err
    assert main(["export", "--model", "digits", "--recipe", "w4g32", "--out", str(tmp_path / "no" / "a.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_user_model(tmp_path, capsys, user):
    out = tmp_path / "user.onnx"
    rc = main(["export", "--model", "usermodels:mlp", "--state-dict", str(user["state_dict"]),
               "--calibration", str(user["calibration"]), "--test", str(user["test"]), "--recipe", "w8a8",
               "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert out.is_file() and sorted(result["layers"]) == ["0", "2"]
    x = user["x"][128:192]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    q = recipes.get("w8a8").apply(user["model"], list(user["x"][:128].split(64)))
    with torch.no_grad():
        ref = q(x).numpy()
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-6   # ONNX Runtime computes lowbit's model
