"""gguf_grid pins GGUF-representable scales; GPTQ with keep_grid=True keeps them and lowers the error."""
from __future__ import annotations

import torch

import lowbit as lb
from lowbit.ops.gguf_grid import fp16_exact, q4_k_decompose
from lowbit.transforms import gguf_grid


def _model_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))
    x = torch.randn(256, 256) @ torch.randn(256, 256) * 0.1     # correlated inputs: GPTQ has something to use
    return model, [x[i:i + 64] for i in range(0, 256, 64)]


def test_gptq_keeps_the_pinned_grid_and_beats_rounding():
    model, batches = _model_and_batches()
    q = lb.quantize(model, weights=lb.QuantSpec(bits=4, granularity=lb.PerGroup(32)))
    assert gguf_grid(q, "q4_k") == {"0": "q4_k", "2": "q5_0"}     # 96-wide rows are not whole super-blocks
    pinned = {i: q[i].weight_quant.scale.clone() for i in (0, 2)}
    report = lb.gptq(q, batches, keep_grid=True)
    for i in (0, 2):
        assert torch.equal(q[i].weight_quant.scale, pinned[i])
    assert q4_k_decompose(q[0].weight_quant.scale) is not None
    assert bool(fp16_exact(q[2].weight_quant.scale).all())
    for r in report.layers:
        assert r.gptq_error < r.rtn_error
    lb.freeze(q)
    assert torch.equal(q[0].weight_scale.float(), pinned[0])


def test_without_keep_grid_gptq_refits():
    model, batches = _model_and_batches()
    q = lb.quantize(model, weights=lb.QuantSpec(bits=4, granularity=lb.PerGroup(32)))
    gguf_grid(q, "q4_0")
    pinned = q[0].weight_quant.scale.clone()
    lb.gptq(q, batches)
    assert not torch.equal(q[0].weight_quant.scale, pinned)
