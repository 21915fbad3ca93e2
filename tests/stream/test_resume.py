"""Kill the run (SIGKILL, no cleanup) at a random unit, resume: the output is byte-identical."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import torch

import lowbit as lb

from _stream_ckpt import shard_bytes

_SCRIPT = textwrap.dedent("""
    import sys, torch, lowbit as lb
    torch.set_num_threads(1)
    calib = torch.load(sys.argv[3], weights_only=True)
    lb.quantize_checkpoint(sys.argv[1], sys.argv[2], lb.recipes.get("w4g128-gptq"), calib, progress=False)
""")


def test_kill_at_a_random_unit_and_resume_is_byte_identical(llama_dir, tmp_path, calib):
    src, _ = llama_dir
    r = lb.recipes.get("w4g128-gptq")
    lb.quantize_checkpoint(src, tmp_path / "full", r, calib, progress=False)
    torch.save(calib, tmp_path / "calib.pt")
    (tmp_path / "run.py").write_text(_SCRIPT)
    rng = random.Random(os.getpid())
    for phase in ("written", "done"):        # after the shard, before the progress file; after both
        unit = rng.randrange(0, 3)           # head, layer 0 or layer 1 (4 units in all)
        dst = tmp_path / f"killed-{phase}"
        env = {**os.environ, "_LOWBIT_STREAM_KILL": f"{unit}:{phase}",
               "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(src), str(dst), str(tmp_path / "calib.pt")],
                              env=env, capture_output=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        assert not (dst / "lowbit.index.json").exists()          # never looks complete
        progress = dst / "lowbit-progress.json"
        done = json.loads(progress.read_text())["done"] if progress.exists() else []
        assert len(done) == unit + (phase == "done")
        s = lb.quantize_checkpoint(src, dst, r, calib, progress=False)
        assert s["resumed_at"] == unit + (phase == "done")
        assert shard_bytes(dst) == shard_bytes(tmp_path / "full")
        assert (dst / "lowbit.index.json").read_bytes() != b""


def test_resume_refuses_another_recipe(qwen2_dir, tmp_path, calib):
    src, _ = qwen2_dir
    dst = tmp_path / "o"
    lb.quantize_checkpoint(src, dst, lb.recipes.get("w4g128"), progress=False)
    import pytest

    with pytest.raises(ValueError, match="different source, recipe or calibration"):
        lb.quantize_checkpoint(src, dst, lb.recipes.get("w4g32"), progress=False)
    s = lb.quantize_checkpoint(src, dst, lb.recipes.get("w4g32"), progress=False, resume=False)
    assert s["resumed_at"] == 0
