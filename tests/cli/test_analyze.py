"""``lowbit analyze`` on a built-in model: report.json and report.html, the summary on stdout."""
import json

import pytest

from lowbit.cli import main


def test_analyze_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["analyze", "--model", "digits", "--recipe", "w8a8", "--samples", "120", "--out", str(out), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert result["summary"]["samples"] == 120 == report["model"]["samples"]
    assert result["summary"]["accuracy_quant"] == report["model"]["accuracy_quant"]
    assert [r["layer"] for r in result["results"]] == [r["layer"] for r in report["layers"]]
    assert report["model"]["kl"] > 0 and report["bound"]["violations"] == 0
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html and "<script" not in html


def test_bad_arguments_fail_cleanly_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["analyze", "--recipe", "w3a3", "--out", str(out)]) == 2
    assert "recipe must be one of" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["analyze", "--samples", "0", "--out", str(out)])
    assert main(["analyze", "--model", "imagenet", "--out", str(out)]) == 2
    assert "--model must be digits, mnist1d, minilm, package.module:factory or a Hugging Face" in capsys.readouterr().err
    assert main(["analyze", "--model", "digits", "--state-dict", "w.pt", "--out", str(out)]) == 2
    assert "--state-dict is for user models" in capsys.readouterr().err
    assert not out.exists()


def test_user_model_is_analysed(tmp_path, capsys, user):
    out = tmp_path / "report"
    rc = main(["analyze", "--model", "usermodels:mlp", "--state-dict", str(user["state_dict"]),
               "--calibration", str(user["calibration"]), "--test", str(user["test"]), "--recipe", "w8a8",
               "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert result["model"] == "usermodels:mlp" and result["summary"]["samples"] == 128
    assert sorted(r["layer"] for r in report["layers"]) == ["0", "2"]
    assert report["model"]["accuracy_float"] == 1.0          # the test labels are the float model's predictions
    assert main(["analyze", "--model", "usermodels:mlp", "--state-dict", str(user["state_dict"]),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "--calibration is required" in capsys.readouterr().err


def test_human_readable_output(tmp_path, capsys):
    assert main(["analyze", "--model", "digits", "--samples", "60", "--out", str(tmp_path), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "KL" in text and "certified" in text and "features.0.0" in text and "report.html" in text


def test_minilm_is_analysed_with_the_transformer_recipe_lowbit_quantize_uses(tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    from lowbit import recipes

    rc = main(["analyze", "--model", "minilm", "--recipe", "w8a8", "--samples", "16", "--out", str(tmp_path), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["resolved_recipe"] == recipes.get("w8a8", family="transformer").name == "w8a8-smooth"
    layers = [r["layer"] for r in result["results"]]
    assert len(layers) == 37 and all(name.endswith(".linear") for name in layers)   # SmoothQuant's explicit factors
    assert result["summary"]["metric"] == "cosine" and 0 < result["summary"]["divergence"] < 0.01
