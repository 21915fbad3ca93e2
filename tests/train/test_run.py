"""lowbit.train.run: QAT beats PTQ at 2 bits, exact resume, NaN handling, refusal of foreign checkpoints."""
import dataclasses

import pytest
import safetensors.torch
import torch

import lowbit as lb
from lowbit import zoo
from lowbit.train import CHECKPOINT_NAME, MODEL_FILE, RunConfig, TrainingStopped, read_checkpoint, run

CONFIG = RunConfig(model="digits", weights=2, activations=8, epochs=2, rounding="stochastic", seed=3)


@pytest.fixture(scope="module")
def digits():
    return zoo.get("digits")


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """An uninterrupted 2-epoch run."""
    model, data = digits
    out = tmp_path_factory.mktemp("reference")
    return run(CONFIG, out, model=model, dataset=data), out


def _tensors(out):
    return safetensors.torch.load_file(str(out / MODEL_FILE))


def test_qat_recovers_what_ptq_loses_at_2_bits(digits, tmp_path):
    model, data = digits
    result = run(dataclasses.replace(CONFIG, rounding="nearest"), tmp_path, model=model, dataset=data)
    float_acc = zoo.evaluate(model, data.x_test, data.y_test)
    assert result["float"]["accuracy"] == float_acc
    assert result["ptq"]["accuracy"] < float_acc - 0.05             # 2-bit PTQ loses a lot here
    assert result["quantized"]["accuracy"] >= result["ptq"]["accuracy"] + 0.03
    assert result["quantized"]["accuracy"] >= float_acc - 0.02
    # the saved integer model is what was measured (checked independently: lb.load + zoo.evaluate)
    q = lb.load(tmp_path / MODEL_FILE, zoo.build_model("digits"))
    assert zoo.evaluate(q, data.x_test, data.y_test) == result["quantized"]["accuracy"]


def test_nan_stops_keeps_the_last_checkpoint_and_resume_matches_an_uninterrupted_run(digits, reference, tmp_path):
    model, data = digits
    ref_result, ref_out = reference
    poisoned = dataclasses.replace(data, x_train=data.x_train.clone())

    def poison_after_first_epoch(event):
        if event["kind"] == "epoch" and event["epoch"] == 1:
            poisoned.x_train[5, 0, 3, 3] = float("nan")

    with pytest.raises(TrainingStopped, match=r"(?s)loss became nan.*last good checkpoint.*after epoch 1"):
        run(CONFIG, tmp_path, model=model, dataset=poisoned, progress=poison_after_first_epoch)
    saved = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert saved["epoch"] == 0 and len(saved["history"]) == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert not (tmp_path / MODEL_FILE).exists()

    result = run(CONFIG, tmp_path, model=model, dataset=data, resume=True)   # data fixed: continue
    assert result["resumed_after_epoch"] == 1
    assert result["quantized"] == ref_result["quantized"]
    assert result["qparams_sha256"] == ref_result["qparams_sha256"]
    assert [e["loss"] for e in result["epochs"]] == [e["loss"] for e in ref_result["epochs"]]
    a, b = _tensors(ref_out), _tensors(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_from_another_recipe_or_model_is_refused(digits, reference, tmp_path):
    model, data = digits
    _, out = reference
    with pytest.raises(ValueError, match="already holds a checkpoint.*--resume"):
        run(CONFIG, out, model=model, dataset=data)
    with pytest.raises(ValueError, match=r"different model or recipe.*rounding: checkpoint 'stochastic', this run "
                                         r"'nearest'.*weights: checkpoint 2, this run 3"):
        run(dataclasses.replace(CONFIG, weights=3, rounding="nearest"), out, model=model, dataset=data, resume=True)
    other = zoo.build_model("digits")                 # an untrained model: different float weights
    with pytest.raises(ValueError, match="float model weights"):
        run(CONFIG, out, model=other, dataset=data, resume=True)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        run(CONFIG, tmp_path, model=model, dataset=data, resume=True)


def test_run_config_rejects_bad_values():
    with pytest.raises(ValueError, match="weights"):
        RunConfig(weights=1)
    with pytest.raises(ValueError, match="activations"):
        RunConfig(activations=40)
    with pytest.raises(ValueError, match="surrogate"):
        RunConfig(surrogate="gumbel")
    with pytest.raises(ValueError, match="lr"):
        RunConfig(lr=float("nan"))
