"""Block-wise GPTQ: the same weights as the full-model passes, one block's activations at a time,
and the per-block API that streamed quantization builds on."""
import gc

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.gptq import blockwise, driver
from lowbit.gptq.blockwise import capture_inputs, gptq_block, next_inputs
from lowbit.quantize import quant_layers

pytest.importorskip("transformers")
from _tiny_models import ResidualMLPBlock, tiny_llama  # noqa: E402

W4G = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerGroup(16))


class Chain(nn.Module):
    def __init__(self, d=24, n=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(ResidualMLPBlock(d) for _ in range(n))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        h = self.inp(x)
        for blk in self.blocks:
            h, _ = blk(h, scale=0.5)
        return self.head(h)


def _llama_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 300, (2, 9), generator=g)} for _ in range(n)]


def _both_paths(monkeypatch, make, batches, **kw):
    """(weights, report) of the block-wise path, then of the full-model passes (chain refused)."""
    out = []
    for chained in (True, False):
        calls = []
        real = driver.gptq_block
        monkeypatch.setattr(driver, "gptq_block", lambda *a, **k: calls.append(1) or real(*a, **k))
        if not chained:
            monkeypatch.setattr(driver, "chain_plan", lambda *a, **k: False)
        q = lb.quantize(make(), weights=W4G)
        report = lb.gptq(q, batches, **kw)
        assert bool(calls) == chained
        out.append(({n: p.detach().clone() for n, p in q.named_parameters()}, report, q))
        monkeypatch.undo()
    return out


@pytest.mark.parametrize("make,batches", [
    (lambda: Chain(), [torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(i)) for i in range(3)]),
    (lambda: tiny_llama(300, hidden=64, inter=128, layers=3), _llama_batches()),
], ids=["chain", "llama"])
def test_blockwise_gives_exactly_the_weights_of_the_full_model_passes(monkeypatch, make, batches):
    (w_new, r_new, q_new), (w_old, r_old, _) = _both_paths(monkeypatch, make, batches, act_order=True)
    assert w_new.keys() == w_old.keys()
    for name in w_old:
        assert torch.equal(w_new[name], w_old[name]), name
    assert [r.name for r in r_new.layers] == [r.name for r in r_old.layers]
    assert r_new.unreached == r_old.unreached == []
    assert all(layer.weight_quant.fixed for _, layer in quant_layers(q_new))


def _live_activations(shape):
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) == shape)


def test_only_one_blocks_activations_are_held(monkeypatch):
    """Count the live tensors shaped like a block's activation whenever the last block starts: the
    block-wise path holds one block's inputs and outputs (at most 3 per batch, counting the ones in
    flight); the full-model passes with replay hold every finished block's outputs, so that count
    grows with depth and this bound fails for them."""
    batches = [torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    bound = 3 * len(batches) + 4
    peaks = {}
    for chained in (True, False):
        if not chained:
            monkeypatch.setattr(driver, "chain_plan", lambda *a, **k: False)
        q = lb.quantize(Chain(n=6), weights=W4G)
        peak = [0]
        last = q.blocks[-1]   # where the former path holds the most: every earlier block's outputs
        hooks = [last.register_forward_pre_hook(lambda *_: peak.__setitem__(0, max(peak[0], _live_activations((3, 7, 24)))))]
        lb.gptq(q, batches)
        for h in hooks:
            h.remove()
        peaks[chained] = peak[0]
        monkeypatch.undo()
    assert peaks[True] <= bound
    assert peaks[False] > bound        # the former path: the bound is a real test


def test_chain_is_refused_when_the_blocks_are_not_a_plain_chain():
    class Skip(Chain):      # block 2 reads the output of block 0, not of block 1
        def forward(self, x):
            h = self.inp(x)
            outs = []
            for i, blk in enumerate(self.blocks):
                h, _ = blk(outs[0] if i == 2 else h, scale=0.5)
                outs.append(h)
            return self.head(h)

    class InPlace(Chain):   # the output is changed in place before the next block reads it
        def forward(self, x):
            h = self.inp(x)
            for blk in self.blocks:
                h, _ = blk(h, scale=0.5)
                h.mul_(1.01)
            return self.head(h)

    x = torch.randn(3, 7, 24)
    for cls in (Skip, InPlace):
        q = lb.quantize(cls(n=3), weights=W4G)
        layers = dict((m, n) for n, m in quant_layers(q))
        assert not blockwise.chain_plan(q, list(q.blocks), x, layers), cls.__name__
    q = lb.quantize(Chain(n=3), weights=W4G)
    layers = dict((m, n) for n, m in quant_layers(q))
    assert blockwise.chain_plan(q, list(q.blocks), x, layers)


def test_gptq_block_api_chains_blocks_like_lb_gptq():
    """capture_inputs -> gptq_block -> next_inputs, block after block, gives lb.gptq's weights."""
    batches = _llama_batches(2, seed=3)
    ref = lb.quantize(tiny_llama(300, hidden=64, inter=128, layers=2), weights=W4G)
    lb.gptq(ref, batches, exclude=["lm_head"])
    q = lb.quantize(tiny_llama(300, hidden=64, inter=128, layers=2), weights=W4G)
    inputs = capture_inputs(q, q.model.layers[0], batches)
    for block in q.model.layers:
        outputs, report = gptq_block(block, inputs)
        assert len(report.layers) == 7 and not report.unreached
        inputs = next_inputs(inputs, outputs)
    for (name, a), (_, b) in zip(ref.model.layers.named_parameters(), q.model.layers.named_parameters()):
        assert torch.equal(a, b), name
