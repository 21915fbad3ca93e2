"""``lowbit demo`` in-process: the JSON structure, progress on stderr, and the numbers are real."""
import json
import os

import pytest
import safetensors.torch
import torch

import lowbit as lb
from lowbit import recipes, zoo
from lowbit.cli import main


def test_json_structure_and_values(capsys, tmp_path):
    assert main(["demo", "--model", "digits", "--recipes", "w8a8,w4g128", "--json"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)                                  # stdout holds the JSON and nothing else
    assert set(res) == {"dataset", "model", "float", "results"}
    assert set(res["float"]) == {"accuracy", "size_bytes"}
    assert res["dataset"] == "digits" and res["model"] == "DigitsCNN"
    assert [r["recipe"] for r in res["results"]] == ["w8a8", "w4g128"]
    assert "[1/2] w8a8" in err and "[2/2] w4g128" in err   # progress went to stderr

    model, data = zoo.get("digits")
    assert res["float"]["accuracy"] == pytest.approx(zoo.evaluate(model, data.x_test, data.y_test))
    float_file = tmp_path / "float.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(float_file))
    assert res["float"]["size_bytes"] == os.path.getsize(float_file)

    row = res["results"][1]                                # recompute w4g128 independently
    q = recipes.get("w4g128").apply(model)
    path = tmp_path / "w4.safetensors"
    lb.save(q, path)
    assert row["size_bytes"] == os.path.getsize(path)
    with torch.no_grad():
        lf, lq = model(data.x_test), q(data.x_test)
    assert row["accuracy"] == pytest.approx((lq.argmax(1) == data.y_test).double().mean().item())
    assert row["agreement"] == pytest.approx((lq.argmax(1) == lf.argmax(1)).double().mean().item())
    kl = torch.nn.functional.kl_div(lq.double().log_softmax(1), lf.double().log_softmax(1), log_target=True,
                                    reduction="batchmean")
    assert row["kl"] == pytest.approx(kl.item(), rel=1e-6, abs=1e-12)
    assert {"kl", "delta_points", "ratio", "seconds"} <= set(row)


def test_text_table_and_quiet(capsys):
    assert main(["demo", "--model", "digits", "--recipes", "w8a8", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "DigitsCNN on digits" in out and "w8a8" in out


def test_unknown_recipe_is_one_error(capsys):
    assert main(["demo", "--model", "digits", "--recipes", "w8a8,w9a9"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "recipe must be one of" in err and "w9a9" in err


def test_formats_table(capsys):
    """``lowbit demo --formats``: rows per format and algorithm; int8 RTN recomputed with lb.quantize directly."""
    assert main(["demo", "--model", "digits", "--formats", "int8,int4 g32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [(r["format"], r["algorithm"]) for r in res["formats"]] == [
        ("int8", "rtn"), ("int8", "gptq"), ("int4 g32", "rtn"), ("int4 g32", "gptq")]
    model, data = zoo.get("digits")
    q = lb.freeze(lb.quantize(model, weights=lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))))
    with torch.no_grad():
        acc = (q(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert res["formats"][0]["accuracy"] == pytest.approx(acc)
    # bits/weight: 8-bit codes + one float16 scale per output channel, over every conv/linear weight
    shapes = [m.weight.shape for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    n = sum(s.numel() for s in shapes)
    assert res["formats"][0]["bits_per_weight"] == pytest.approx(sum(8 * s.numel() + 16 * s[0] for s in shapes) / n)
    assert res["formats"][2]["bits_per_weight"] > 4.5      # int4 g32: 4 + 16/32, more where rows are partial groups
    assert main(["demo", "--model", "digits", "--formats", "int8"]) == 0
    text = capsys.readouterr().out
    assert "bits/weight" in text and "int8" in text
    assert main(["demo", "--formats", "bogus"]) != 0
