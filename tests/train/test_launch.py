"""DistributedDataParallel QAT on 2 CPU processes (gloo on 127.0.0.1, a free port)."""
import hashlib

import pytest
import torch

import lowbit as lb
from lowbit import zoo
from lowbit.train import MODEL_FILE, RunConfig, spawn

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_two_processes_end_with_identical_grids_and_the_loss_falls(tmp_path):
    model, data = zoo.get("digits")
    config = RunConfig(model="digits", weights=2, activations=8, observer="minmax", epochs=2, seed=1)
    results = spawn(2, config, tmp_path, model=model, dataset=data, backend="gloo")
    assert [r["world_size"] for r in results] == [2, 2]
    # every scale and zero point bit-equal across ranks: the ranks' own digests, and an all_gather check
    assert results[0]["qparams_sha256"] == results[1]["qparams_sha256"]
    assert all(r["replicas_agree"] for r in results)
    for r in results:
        losses = [e["loss"] for e in r["epochs"]]
        assert losses[1] < 0.7 * losses[0]
    # calibration was all-reduced: each rank saw half the batches, yet PTQ equals calibrating on all of them
    q = lb.quantize(model, weights=config.weight_spec(), activations=config.activation_spec(), observer="minmax")
    with lb.calibrate(q):
        for b in zoo.calibration_batches(data, num_batches=config.calibration_batches, seed=config.seed):
            q(b)
    single = hashlib.sha256(lb.qat.qparams_digest(q).numpy().tobytes()).hexdigest()[:16]
    assert results[0]["ptq"]["qparams_sha256"] == results[1]["ptq"]["qparams_sha256"] == single
    assert results[0]["ptq"]["accuracy"] == zoo.evaluate(q, data.x_test, data.y_test)
    assert (tmp_path / MODEL_FILE).exists()
    assert results[0]["quantized"]["accuracy"] > results[0]["ptq"]["accuracy"]

