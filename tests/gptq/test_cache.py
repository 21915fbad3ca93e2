"""Replaying finished blocks: the same GPTQ result as recomputing them, with fewer block runs."""
import torch
from torch import nn

import lowbit as lb
from lowbit.gptq.cache import find_blocks
from _tiny_models import ResidualMLPBlock

W4G = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerGroup(16))


class Tower(nn.Module):
    """Blocks in a ModuleList, one of them called twice, an in-place update after each block,
    keyword arguments, and a head outside the list."""

    def __init__(self, d=32, n=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(ResidualMLPBlock(d) for _ in range(n))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        for i, blk in enumerate(self.blocks):
            h, _ = blk(h, scale=0.5)
            h.mul_(1.01)                       # in place on the block's output
            if i == 1:
                h, _ = blk(h, scale=0.25)      # shared block, second call
        return self.head(h)


def _calls(model):
    count = {"n": 0}
    hooks = [blk.a.register_forward_hook(lambda *a: count.__setitem__("n", count["n"] + 1)) for blk in model.blocks]
    return count, hooks


def test_replay_gives_exactly_the_weights_of_recomputing_and_runs_blocks_less():
    m = Tower().eval()
    xs = [torch.randn(6, 5, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    results = {}
    for replay in (False, True):
        q = lb.quantize(m, weights=W4G)
        count, hooks = _calls(q)
        lb.gptq(q, xs, act_order=True, replay=replay)
        for h in hooks:
            h.remove()
        results[replay] = (q, count["n"])
    (q0, n0), (q1, n1) = results[False], results[True]
    for (name, a), (_, b) in zip(q0.named_parameters(), q1.named_parameters()):
        assert torch.equal(a, b), name
    assert n1 < n0
    with torch.no_grad():
        assert torch.equal(q0(xs[0]), q1(xs[0]))
    assert not any("forward" in blk.__dict__ for blk in q1.blocks)     # the wrappers are removed


def test_blocks_are_the_outermost_list_children_holding_a_layer():
    m = Tower()
    q = lb.quantize(m, weights=W4G)
    layers = {mod for mod in q.modules() if isinstance(mod, lb.modules.QuantLayer)}
    assert find_blocks(q, layers) == list(q.blocks)
    only_head = {q.head}
    assert find_blocks(q, only_head) == []
    seq = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    assert find_blocks(seq, {seq[0][0]}) == [seq[0]]
