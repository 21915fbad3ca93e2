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



def test_torchrun_launch_equals_the_cli_launcher(tmp_path):
    """``torchrun -m lowbit train`` joins the group from torchrun's environment variables and reaches
    exactly what ``lowbit train --nproc 2`` (lowbit's own launcher) reaches."""
    import json
    import os
    import pathlib
    import signal
    import subprocess
    import sys

    src = str(pathlib.Path(lb.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    args = ["train", "--model", "digits", "--weights", "4", "--activations", "8", "--epochs", "1", "--json"]
    runs = {}
    for how, prefix in (("torchrun", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                      "--standalone", "-m", "lowbit"]),
                        ("cli", [sys.executable, "-m", "lowbit"])):
        extra = ["--nproc", "2"] if how == "cli" else []
        proc = subprocess.Popen([*prefix, *args, *extra, "--out", str(tmp_path / how)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)      # the launcher and every worker it started
            proc.communicate()
            raise
        assert proc.returncode == 0, stderr[-2000:]
        runs[how] = json.loads(stdout)
    a, b = runs["torchrun"], runs["cli"]
    assert a["world_size"] == b["world_size"] == 2 and a["replicas_agree"] and b["replicas_agree"]
    assert a["qparams_sha256"] == b["qparams_sha256"] and a["quantized"] == b["quantized"]
