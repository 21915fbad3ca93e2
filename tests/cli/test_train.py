"""``lowbit train``: the CLI end to end on the digits CNN, and its input errors."""
import json

import pytest

import lowbit as lb
from lowbit import zoo
from lowbit.cli import build_parser, main


def test_train_reports_json_and_saves_the_model_it_measured(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "digits", "--weights", "3", "--activations", "8", "--epochs", "1",
                 "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert set(result) >= {"float", "ptq", "quantized", "epochs", "recipe"}
    assert "epoch 1/1" in captured.err                      # progress goes to stderr
    model, data = zoo.get("digits")
    assert result["float"]["accuracy"] == zoo.evaluate(model, data.x_test, data.y_test)
    q = lb.load(out / "model.safetensors", zoo.build_model("digits"))
    assert zoo.evaluate(q, data.x_test, data.y_test) == result["quantized"]["accuracy"]
    assert json.loads((out / "result.json").read_text())["quantized"] == result["quantized"]
    # a second run into the same directory is refused, not overwritten
    assert main(["train", "--model", "digits", "--weights", "2", "--epochs", "1", "--out", str(out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_train_arguments_parse_into_a_recipe(capsys):
    args = build_parser().parse_args(["train", "--activations", "none", "--rounding", "stochastic",
                                      "--surrogate", "noise", "--no-learn-scales"])
    assert args.activations is None and args.rounding == "stochastic" and args.surrogate == "noise"
    assert args.learn_scales is False
    assert build_parser().parse_args(["train", "--activations", "0"]).activations is None
    assert main(["train", "--weights", "1", "--out", "unused"]) == 2
    assert "weights must be a bit width" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--rounding", "up"])


def test_train_a_user_model(tmp_path, capsys, user):
    out = tmp_path / "run"
    train = tmp_path / "train.pt"
    import torch

    torch.save((user["x"][:128], user["y"][:128]), train)
    code = main(["train", "--model", "usermodels:mlp", "--state-dict", str(user["state_dict"]), "--train", str(train),
                 "--test", str(user["test"]), "--weights", "4", "--activations", "8", "--epochs", "1",
                 "--batch-size", "32", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["float"]["accuracy"] == 1.0               # the labels are the float model's predictions
    q = lb.load(out / "model.safetensors", user["model"])
    x, y = user["x"][128:], user["y"][128:]
    with torch.no_grad():
        acc = (q(x).argmax(1) == y).double().mean().item()
    assert acc == pytest.approx(result["quantized"]["accuracy"])
    assert main(["train", "--model", "usermodels:mlp", "--state-dict", str(user["state_dict"]),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "needs --state-dict" in capsys.readouterr().err
    assert main(["train", "--model", "digits", "--train", str(train), "--out", str(tmp_path / "r3")]) == 2
    assert "--train is for user models" in capsys.readouterr().err
