"""``lowbit quantize``: built-in and user models, and every bad input gives exit 2, one clear line,
and leaves the file at --out as it was."""
import json
import os

import pytest
import torch

import lowbit as lb
from lowbit import zoo
from lowbit.cli import main


def _run(capsys, *argv):
    code = main(["quantize", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_builtin_model_writes_a_checkpoint_that_loads(capsys, tmp_path):
    out = tmp_path / "digits-w4.safetensors"
    code, stdout, err = _run(capsys, "--model", "digits", "--recipe", "w4g128", "--out", out, "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["out"] == str(out) and s["size_bytes"] == os.path.getsize(out)
    model, data = zoo.get("digits")
    q = lb.load(out, model)                                      # independent: reload and evaluate
    assert s["accuracy"] == pytest.approx(zoo.evaluate(q, data.x_test, data.y_test))
    assert s["float_accuracy"] == pytest.approx(zoo.evaluate(model, data.x_test, data.y_test))
    assert sorted(s["quantized"]) == sorted(n for n, m in model.named_modules()
                                            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def test_user_model_with_calibration_and_test_files(capsys, user):
    code, stdout, err = _run(capsys, "--model", "usermodels:mlp", "--state-dict", user["state_dict"],
                             "--calibration", user["calibration"], "--test", user["test"], "--recipe", "w8a8",
                             "--out", user["out"], "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["eval_on"] == "test" and s["samples"] == 128
    cov = s["coverage"]                                           # every layer accounted for
    linears = [n for n, m in user["model"].named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(cov["quantized"]) == sorted(linears) and cov["linear_like_float"] == []
    q = lb.load(user["out"], user["model"])
    x = user["x"][128:]
    with torch.no_grad():
        zf, zq = user["model"](x), q(x)
    assert s["agreement"] == pytest.approx((zf.argmax(1) == zq.argmax(1)).double().mean().item())
    assert s["agreement"] >= 0.95
    assert s["float_accuracy"] == 1.0                            # the labels are the float model's predictions


def test_user_model_text_summary(capsys, user):
    code, stdout, err = _run(capsys, "--model", "usermodels:mlp", "--state-dict", user["state_dict"],
                             "--recipe", "w4g32", "--out", user["out"])
    assert code == 0, err
    assert stdout.startswith(f"wrote {user['out']}")


def _unchanged(user):
    return user["out"].read_bytes() == b"precious"


@pytest.mark.parametrize("case,argv,message", [
    ("no quantizable layer", ["--model", "usermodels:relu_only", "--state-dict", "EMPTY_SD", "--recipe", "w4g128"],
     "no layer was quantized"),
    ("empty calibration tensor", ["--model", "usermodels:mlp", "--state-dict", "SD", "--calibration", "EMPTY_X"],
     "holds no sample"),
    ("empty calibration list", ["--model", "usermodels:mlp", "--state-dict", "SD", "--calibration", "EMPTY_LIST"],
     "calibration would see no batch"),
    ("activations without calibration", ["--model", "usermodels:mlp", "--state-dict", "SD", "--recipe", "w8a8"],
     "needs calibration inputs"),
    ("exclude matches nothing", ["--model", "usermodels:mlp", "--state-dict", "SD", "--recipe", "w4g128",
                                 "--exclude", "classifier"], "exclude pattern 'classifier' matches no module"),
    ("include matches nothing", ["--model", "digits", "--include", "encoder.*"], "include pattern 'encoder.*'"),
    ("factory does not import", ["--model", "no_such_pkg.models:make", "--state-dict", "SD"],
     "cannot import module 'no_such_pkg.models'"),
    ("factory name missing", ["--model", "usermodels:resnet", "--state-dict", "SD"], "has no attribute 'resnet'"),
    ("factory builds no module", ["--model", "usermodels:not_a_model", "--state-dict", "SD"], "not a torch.nn.Module"),
    ("state dict does not fit", ["--model", "usermodels:wider", "--state-dict", "SD", "--recipe", "w4g128"],
     "state_dict does not fit the model"),
    ("state dict missing", ["--model", "usermodels:mlp", "--recipe", "w4g128"], "--state-dict is required"),
    ("state dict file missing", ["--model", "usermodels:mlp", "--state-dict", "NOFILE"], "no file"),
    ("unknown recipe", ["--model", "digits", "--recipe", "w9a9"], "recipe must be one of"),
    ("unknown model", ["--model", "resnet", "--recipe", "w8a8"], "'digits', 'mnist1d', 'minilm'"),
    ("state dict for a built-in", ["--model", "digits", "--state-dict", "SD"], "--state-dict is for user models"),
    ("out is an input", ["--model", "usermodels:mlp", "--state-dict", "SD", "--recipe", "w4g128", "--out", "SD"],
     "is an input of this run"),
])
def test_bad_input(capsys, user, case, argv, message):
    d = user["dir"]
    torch.save({}, d / "empty_sd.pt")
    torch.save(torch.empty(0, 8), d / "empty_x.pt")
    torch.save([], d / "empty_list.pt")
    subst = {"SD": user["state_dict"], "EMPTY_SD": d / "empty_sd.pt", "EMPTY_X": d / "empty_x.pt",
             "EMPTY_LIST": d / "empty_list.pt", "NOFILE": d / "missing.pt"}
    argv = [str(subst.get(a, a)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(user["out"])]
    sd_before = user["state_dict"].read_bytes()
    code, stdout, err = _run(capsys, *argv)
    assert code == 2, (case, err)
    assert stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit quantize: error: "), err
    assert message in lines[0], lines[0]
    assert _unchanged(user)
    assert user["state_dict"].read_bytes() == sd_before


def test_out_directory_must_exist(capsys, user):
    target = user["dir"] / "no" / "such" / "dir" / "q.safetensors"
    code, stdout, err = _run(capsys, "--model", "usermodels:mlp", "--state-dict", user["state_dict"],
                             "--recipe", "w4g128", "--out", target)
    assert code == 2 and "does not exist" in err and "create it first" in err
    assert not (user["dir"] / "no").exists()
