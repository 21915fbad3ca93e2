"""Streaming gives the in-memory result: same tensors (codes, scales, norms) as Recipe.apply on the
whole model with the same calibration batches, and the same logits after lb.load into a meta model.
Recipes: round to nearest, GPTQ, AWQ + GPTQ, SmoothQuant + static int8 activations (lb.calibrate)."""
import pytest
import torch

import lowbit as lb

from _stream_ckpt import meta_model


def _compare(ref, q):
    a, b = ref.state_dict(), q.state_dict()
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]


@pytest.mark.parametrize("fixture,recipe", [("qwen2_dir", "w4g128"), ("llama_dir", "w4g128-gptq"),
                                            ("llama_dir", "w4g128-awq-gptq"), ("qwen2_dir", "w8a8-smooth")])
def test_same_codes_and_logits_as_in_memory(request, tmp_path, calib, fixture, recipe):
    src, model = request.getfixturevalue(fixture)
    r = lb.recipes.get(recipe)
    summary = lb.quantize_checkpoint(src, tmp_path / "out", r, calib, progress=False)
    assert summary["blocks"] == 2 and summary["resumed_at"] == 0
    assert (tmp_path / "out" / "lowbit.index.json").is_file()
    assert not (tmp_path / "out" / ".lowbit-work").exists()
    ref = r.apply(model, list(calib.split(1)))           # the in-memory path: the oracle
    q = lb.load(tmp_path / "out", meta_model(src))
    _compare(ref, q)
    with torch.no_grad():
        assert torch.equal(ref(calib).logits, q(calib).logits)
        # and the quantized model is close to the float one (it is a real quantization)
        f = model(calib).logits
        assert 0 < (q(calib).logits - f).abs().max() < 0.5 * f.abs().max()


def test_spilled_activations_give_the_same_bytes(llama_dir, tmp_path, calib):
    from _stream_ckpt import shard_bytes

    src, _ = llama_dir
    r = lb.recipes.get("w4g128-gptq")
    lb.quantize_checkpoint(src, tmp_path / "a", r, calib, progress=False)
    with pytest.raises(ValueError, match="too small") as e:      # the smallest budget that fits one block
        lb.quantize_checkpoint(src, tmp_path / "b", r, calib, progress=False, memory_budget=1e3)
    need = float(str(e.value).rsplit(">= ", 1)[1].split(" ")[0])
    s = lb.quantize_checkpoint(src, tmp_path / "b", r, calib, progress=False, memory_budget=need * 1.001)
    assert s["spilled"]
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_rerun_of_a_finished_run_does_nothing(qwen2_dir, tmp_path):
    src, _ = qwen2_dir
    r = lb.recipes.get("w4g128")
    lb.quantize_checkpoint(src, tmp_path / "o", r, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()}
    s = lb.quantize_checkpoint(src, tmp_path / "o", r, progress=False)
    assert s["resumed_at"] == s["units"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()} == before
