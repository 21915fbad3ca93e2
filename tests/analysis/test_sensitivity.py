import itertools

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.analysis import allocate_bits, apply_bits, bit_sensitivity, kl, layer_sensitivity

W4T = lb.QuantSpec(bits=4)   # per-tensor: one outlier sets the step of the whole layer


@pytest.fixture
def mlp(digits, trained):
    """A trained MLP whose last layer has one harmless outlier weight (from a dead hidden unit), so
    that per-tensor quantization of that layer, and only that one, is very sensitive."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    trained(m, steps=200, flat=False)
    with torch.no_grad():
        m[3].weight[7].zero_()
        m[3].bias[7] = -1.0            # hidden unit 7 of the second layer is always 0 after the ReLU
        m[5].weight[:, 7] = 8.0        # so this outlier does not change the float function
    return m.eval()


def _only(m, name, spec, x):
    q = lb.quantize(m, weights=spec, include=[name])
    return float(kl(m(x), q(x)).mean())


def test_sensitivity_matches_quantizing_each_layer_alone_and_ranks_the_outlier_layer_first(mlp, digits):
    x = digits[2]
    q = lb.quantize(mlp, weights=W4T)
    s = layer_sensitivity(mlp, q, [x[:200], x[200:]])
    assert s.ranking[0] == "5" and s.metric == "kl"
    assert s.layers["5"] > 10 * max(s.layers["1"], s.layers["3"])
    for name in ("1", "3", "5"):   # oracle: lb.quantize with include=[name], everything else float
        assert s.layers[name] == pytest.approx(_only(mlp, name, W4T, x), rel=1e-6, abs=1e-12)


def test_per_layer_sensitivities_add_up_for_small_errors(rescnn, quantized):
    m, x, _ = rescnn
    s = layer_sensitivity(m, quantized(m, 8, 8), [x])
    assert 0.5 < s.additivity < 2.0


def test_the_allocation_is_the_exact_knapsack_optimum():
    g = torch.Generator().manual_seed(0)
    bits = (2, 3, 4, 6, 8)
    for trial in range(20):
        names = [f"l{i}" for i in range(4)]
        sizes = {n: int(s) for n, s in zip(names, torch.randint(1, 50, (4,), generator=g))}
        sens = {n: {b: float(torch.rand(1, generator=g)) * 2.0 ** -b for b in bits} for n in names}
        budget = 3 + float(torch.rand(1, generator=g)) * 3
        plan = allocate_bits(sens, sizes, budget)
        total = sum(sizes.values())
        best = min((sum(sens[n][b] for n, b in zip(names, c)), c) for c in itertools.product(bits, repeat=4)
                   if sum(sizes[n] * b for n, b in zip(names, c)) <= budget * total)
        assert plan.predicted == pytest.approx(best[0], rel=1e-12)
        assert plan.average_bits <= budget and plan.exact


def test_mixed_precision_beats_uniform_bits_at_the_same_size(mlp, digits):
    x = digits[2]
    q = lb.quantize(mlp, weights=W4T)
    table = bit_sensitivity(mlp, q, [x])
    assert table["5"][2] > table["5"][8]
    sizes = {n: l.weight.numel() for n, l in lb.quant_layers(q)}
    plan = allocate_bits(table, sizes, budget=4.0)
    assert plan.average_bits <= 4.0 and plan.bits["5"] > 4
    mixed, uniform = apply_bits(q, plan.bits), apply_bits(q, {n: 4 for n in sizes})
    assert mixed[5].weight_quant.spec.bits == plan.bits["5"]
    kl_mixed, kl_uniform = float(kl(mlp(x), mixed(x)).mean()), float(kl(mlp(x), uniform(x)).mean())
    assert kl_mixed < 0.5 * kl_uniform


def test_bad_budgets_and_frozen_models_are_refused(mlp, digits):
    with pytest.raises(ValueError, match="budget"):
        allocate_bits({"a": {4: 0.1, 8: 0.0}}, {"a": 10}, budget=3)
    with pytest.raises(ValueError, match="sizes"):
        allocate_bits({"a": {4: 0.1}}, {}, budget=4)
    q = lb.quantize(mlp, weights=W4T)
    with pytest.raises(ValueError, match="no_such"):
        apply_bits(q, {"no_such": 4})
    lb.freeze(q)
    with pytest.raises(ValueError, match="before lb.freeze"):
        apply_bits(q, {"1": 4})
    # sensitivity still works on a frozen model (float weights come from the float model)
    s = layer_sensitivity(mlp, q, [digits[2]])
    assert s.ranking[0] == "5"


class _Shared(nn.Module):
    """A residual block and a module called twice (its output must not be replayed)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.act(self.a(x.flatten(1)))
        h = self.act(h + self.b(h))
        return self.c(h)


@pytest.mark.parametrize("which", ["rescnn", "shared"])
def test_replaying_the_float_prefix_changes_no_output(which, rescnn, digits, quantized, monkeypatch):
    from lowbit.analysis import probe as probe_mod
    m = rescnn[0] if which == "rescnn" else _Shared().eval()
    q = quantized(m, 4, 8)
    batches = [digits[2][:100], digits[2][100:200]]
    fast, slow = probe_mod.Probe(m, q), probe_mod.Probe(m, q)
    monkeypatch.setattr(probe_mod, "MAX_CACHE_BYTES", 0)     # slow: nothing replayed
    slow.outputs(batches)
    monkeypatch.undo()
    fast.outputs(batches)
    assert fast._cache and not slow._cache
    for name in fast.names:
        fast.quantize_only(name)
        slow.quantize_only(name)
        assert torch.equal(fast.outputs(batches), slow.outputs(batches))


def test_after_gptq_the_float_reference_is_the_float_models_weight(mlp, digits):
    """GPTQ rewrites q's master weights onto the grid; analysis must still compare with float_model."""
    from lowbit.analysis.probe import weight_pairs

    x = digits[0][:256]
    spec = lb.QuantSpec(bits=4, granularity=lb.PerChannel(0))
    q = lb.quantize(mlp, weights=spec)
    lb.gptq(q, [x[:128], x[128:]])
    for name, (wf, wq) in weight_pairs(mlp, q).items():
        assert torch.equal(wf, mlp.get_submodule(name).weight)
        assert not torch.equal(wf, wq)
    s = layer_sensitivity(mlp, q, [digits[2]])
    for name in ("1", "3", "5"):   # oracle: this layer's GPTQ weights in the float model, the rest float
        only = __import__("copy").deepcopy(mlp)
        with torch.no_grad():
            only.get_submodule(name).weight.copy_(q.get_submodule(name).quantized_weight())
            want = float(kl(mlp(digits[2]), only(digits[2])).mean())
        assert s.layers[name] == pytest.approx(want, rel=1e-5, abs=1e-12)
    assert s.all_layers > max(s.layers.values())


class _Blocks(nn.Module):
    """A pre-LN branch (q/k read only the norm: SmoothQuant folds) and a post-LN one (explicit)."""

    def __init__(self, d=16):
        super().__init__()
        torch.manual_seed(2)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.q(h) * torch.sigmoid(self.k(h))
        y = self.ln2(x)
        return y + self.o(y)        # the norm output is also the residual: o's factor stays explicit


@pytest.mark.parametrize("transform", ["smooth_quant", "awq"])
def test_a_frozen_smoothed_model_is_analysed_against_the_original_float_model(transform):
    from lowbit.analysis.probe import weight_pairs

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 5, 16, generator=g) * torch.linspace(0.5, 20, 16) for _ in range(3)]
    model = _Blocks().eval()
    spec = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))
    if transform == "smooth_quant":
        smoothed = lb.transforms.smooth_quant(model, xs, alpha=0.8)
        info = smoothed.lowbit_smoothing
    else:
        smoothed = lb.transforms.awq(model, xs, lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerChannel(0)))
        info = smoothed.lowbit_awq
    assert info.layers["q"].how == "folded into ln1" and info.layers["o"].how == "explicit"
    q = lb.freeze(lb.quantize(smoothed, weights=spec))
    pairs = weight_pairs(model, q)              # the original model: no factors, no wrappers
    assert set(pairs) == {"q", "k", "o.linear"}
    for name, (wf, _) in pairs.items():         # oracle: the transformed float model's own weights
        torch.testing.assert_close(wf, smoothed.get_submodule(name).weight.detach(), rtol=1e-5, atol=1e-6)
    s = layer_sensitivity(model, q, xs, metric="mse")
    assert all(v >= 0 for v in s.layers.values()) and s.all_layers > 0
