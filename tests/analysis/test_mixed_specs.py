"""Mixed precision over weight specs under a stored-bits budget (lowbit.analysis.mixed_specs)."""
import itertools
import math

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit import recipes
from lowbit.analysis.mixed_specs import (allocate_specs, bits_per_weight, mixed_precision, spec_sensitivity,
                                         storage_bits)
from lowbit.analysis.sensitivity import float_outputs

W4G = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerGroup(16))
W8C = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))


def _mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16))
    with torch.no_grad():
        m[2].weight[:, 3] *= 12        # an outlier column: layer 2 suffers most at 4 bits
    return m.eval()


@pytest.mark.parametrize("spec", [W4G, W8C, lb.QuantSpec(bits=4, granularity=lb.PerGroup(32)),
                                  lb.QuantSpec(bits=8, symmetric=False, granularity=lb.PerTensor())])
def test_storage_bits_is_what_a_qtensor_with_float16_scales_stores(spec):
    torch.manual_seed(1)
    w = torch.randn(24, 64)
    w[:, :8] += 3.0                    # asymmetric rows: zero points differ from the middle code
    scale, zp = lb.ops.choose_qparams(w, spec)
    qt = lb.QTensor.from_float(w, spec, scale, zp, scale_dtype=torch.float16)
    # oracle: the bytes QTensor holds (packed codes, float16 scales, one-byte zero points when stored)
    assert storage_bits(spec, w.shape) == 8 * qt.nbytes
    assert bits_per_weight(spec, w.shape) == pytest.approx(8 * qt.nbytes / w.numel())


def test_allocation_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(3)
    names = [f"l{i}" for i in range(6)]
    sens = {n: {0: float(torch.rand(1, generator=g)) + 0.5, 1: float(torch.rand(1, generator=g)) * 0.5,
                2: 0.0} for n in names}
    costs = {n: {0: 4.2 * (i + 1) * 100, 1: 5.1 * (i + 1) * 100, 2: 8.0 * (i + 1) * 100} for i, n in enumerate(names)}
    budget = 5.0 * sum((i + 1) * 100 for i in range(6))
    choice, total, value, exact = allocate_specs(sens, costs, budget)
    best = min((sum(sens[n][c] for n, c in zip(names, cs)), cs) for cs in itertools.product(range(3), repeat=6)
               if sum(costs[n][c] for n, c in zip(names, cs)) <= budget)
    assert exact and value == pytest.approx(best[0]) and total <= budget
    assert total == pytest.approx(sum(costs[n][choice[n]] for n in names))
    with pytest.raises(ValueError, match="raise the budget"):
        allocate_specs(sens, costs, 1.0)


def test_sensitivity_is_the_divergence_with_one_layer_quantized():
    m = _mlp()
    x = [torch.randn(32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    q = lb.quantize(m, weights=W4G)
    sens, metric = spec_sensitivity(q, x, [W4G, W8C], metric="mse")
    assert metric == "mse"
    ref = float_outputs(m, x)
    # oracle: quantize layer "2" alone by hand with the ops and run the float model
    one = lb.quantize(m, weights=W8C, include=["2"])
    out = float_outputs(one, x)
    assert sens["2"][1] == pytest.approx(float(((ref - out) ** 2).mean()), rel=1e-5)
    assert sens["2"][0] > sens["0"][0]          # the outlier layer is the sensitive one


def test_mixed_precision_picks_the_best_mix_within_the_budget():
    m = _mlp()
    x = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    q = lb.quantize(m, weights=W4G)
    shapes = {"0": (64, 32), "2": (48, 64), "4": (16, 48)}
    n = sum(math.prod(s) for s in shapes.values())
    low = sum(storage_bits(W4G, s) for s in shapes.values()) / n
    budget = low + (storage_bits(W8C, shapes["2"]) - storage_bits(W4G, shapes["2"])) / n + 1e-6
    alloc = mixed_precision(q, x, [W4G, W8C], budget, metric="mse")
    # oracle: brute force over the measured sensitivities and the stored sizes
    names = list(shapes)
    feasible = [cs for cs in itertools.product(range(2), repeat=3)
                if sum(storage_bits([W4G, W8C][c], shapes[k]) for k, c in zip(names, cs)) <= budget * n]
    best = min(feasible, key=lambda cs: sum(alloc.sensitivities[k][c] for k, c in zip(names, cs)))
    assert tuple(alloc.choice[k] for k in names) == best and 1 in best
    assert alloc.bits_per_weight <= budget
    for k in names:
        assert dict(q.named_modules())[k].weight_quant.spec == [W4G, W8C][alloc.choice[k]]
    # the chosen mix beats all-4-bit on the outputs
    ref = float_outputs(m, x)
    all4 = lb.quantize(m, weights=W4G)
    assert float(((float_outputs(q, x) - ref) ** 2).mean()) < float(((float_outputs(all4, x) - ref) ** 2).mean())


def test_errors_leave_the_model_unchanged():
    m = _mlp()
    x = [torch.randn(8, 32)]
    q = lb.quantize(m, weights=W4G)
    with pytest.raises(ValueError, match="raise the budget"):
        mixed_precision(q, x, [W4G, W8C], 1.0)
    assert all(q[i].weight_quant.spec == W4G for i in (0, 2, 4))
    with pytest.raises(ValueError, match="at least two"):
        mixed_precision(q, x, [W4G], 5.0)
    lb.gptq(q, x)
    with pytest.raises(ValueError, match="before GPTQ"):
        mixed_precision(q, x, [W4G, W8C], 5.0)


def test_recipe_step():
    m = _mlp()
    x = [torch.randn(32, 32)]
    rec = recipes.Recipe("t", "mixed", W4G, transforms=(("mixed_precision", {"candidates": [W4G, W8C],
                                                                               "budget": 6.0}), "gptq"))
    q = rec.apply(m, x)
    assert q.lowbit_mixed.bits_per_weight <= 6.0


class _Seq(nn.Module):
    """Token model: [batch, tokens, 16] -> [batch, tokens, 8], like a transformer's hidden states."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_sensitivity_over_batches_of_different_sequence_lengths():
    m = _Seq().eval()
    x = [torch.randn(4, t, 16, generator=torch.Generator().manual_seed(t)) for t in (3, 7, 5)]
    q = lb.quantize(m, weights=W4G)
    sens, metric = spec_sensitivity(q, x, [W4G, W8C], metric="cosine")
    # oracle: per-token 1 - cosine with layer "b" alone at int8, averaged over every token of every batch
    one = lb.quantize(m, weights=W8C, include=["b"])
    with torch.no_grad():
        cos = torch.cat([torch.nn.functional.cosine_similarity(m(b), one(b), dim=-1).reshape(-1) for b in x])
    assert sens["b"][1] == pytest.approx(float((1 - cos).mean()), rel=1e-2)   # 1 - cos in float32
