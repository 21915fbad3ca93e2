"""Recipe families: a generic name resolves to the family's variant, which is a recipe of its own."""
import pytest

from lowbit import recipes


def test_transformer_family_resolves_to_its_variants():
    assert recipes.resolve("w8a8") == "w8a8"
    assert recipes.resolve("w8a8", "transformer") == recipes.VARIANTS["transformer"]["w8a8"] != "w8a8"
    smooth = recipes.get("w8a8", family="transformer")
    assert smooth is recipes.get(smooth.name)
    assert any((t[0] if isinstance(t, tuple) else t) == "smooth_quant" for t in smooth.transforms)
    assert recipes.get("w4a8", family="transformer") is recipes.get("w4a8")     # no variant: the generic one
    w4 = recipes.get("w4g128", family="transformer")
    assert w4.weights.bits == 4 and w4.weights.granularity.size == 128 and w4.activations is None


def test_register_variant_checks_names():
    with pytest.raises(ValueError, match="not a registered recipe"):
        recipes.register_variant("transformer", "w8a8", "w8a8-nonexistent")
    with pytest.raises(ValueError, match="not a registered recipe"):
        recipes.register_variant("cnn", "nope", "w8a8")
    with pytest.raises(TypeError):
        recipes.register_variant("", "w8a8", "w8a8")
    with pytest.raises(ValueError, match="family must be one of"):
        recipes.get("w8a8", family="diffusion")
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipes.get("w9a9", family="transformer")


def test_gptq_recipe_step_runs_before_freeze_and_beats_round_to_nearest():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(128, 128, generator=g) / 8            # correlated inputs: where GPTQ helps
    batches = [torch.randn(64, 128, generator=g) @ mix for _ in range(4)]
    test = torch.randn(256, 128, generator=g) @ mix
    gptq = recipes.get("w4g128", family="transformer")
    assert "gptq" in [t[0] for t in gptq.transforms] and gptq.needs_calibration
    rtn = recipes.Recipe("rtn", "same grid, round to nearest", gptq.weights)
    with torch.no_grad():
        ref = model(test)
        err_gptq = (gptq.apply(model, batches)(test) - ref).pow(2).mean()
        err_rtn = (rtn.apply(model, batches)(test) - ref).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


def _tiny_bert_batches():
    import torch

    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 100, (8, 12), generator=g),
             "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(6)]


def test_w4_nf4_mixed_stays_within_4_5_bits_and_beats_uniform_nf4():
    """The mixed recipe spends the bits NF4 with double-quantized scales saves (4.26 per weight) on
    int8 for the most sensitive layers: within 4.5 stored bits per weight it must be closer to float
    than the same NF4 grid everywhere with the same GPTQ (measured 0.82x the error)."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny_models import tiny_bert
    from lowbit.analysis.mixed_specs import model_bits_per_weight

    model = tiny_bert(100, hidden=64, layers=2, seed=1)
    with torch.no_grad():             # weights 4x the init scale (errors well above float noise) and three
        for m in model.modules():     # outlier input columns in one layer: the one NF4 serves worst
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(4)
        model.encoder.layer[1].attention.self.value.weight[:, :3] *= 8
    batches = _tiny_bert_batches()
    calib, test = batches[:4], batches[4:]
    rec = recipes.get("w4-nf4-mixed")
    assert rec.weights.format == "nf4_dq" and rec.embeddings is not None
    uniform = recipes.Recipe("u", "nf4_dq g32 everywhere, GPTQ", rec.weights,
                             transforms=(("gptq", {"act_order": True}),), embeddings=rec.embeddings)
    q_mixed = rec.apply(model, calib, freeze=False)
    alloc = q_mixed.lowbit_mixed
    assert alloc.bits_per_weight <= 4.5 and model_bits_per_weight(q_mixed) <= 4.5
    assert [n for n, i in alloc.choice.items() if i == 1] == ["encoder.layer.1.attention.self.value"]
    q_uniform = uniform.apply(model, calib, freeze=False)

    def err(q):
        with torch.no_grad():
            return sum(float((1 - torch.nn.functional.cosine_similarity(model(**b).last_hidden_state,
                                                                       q(**b).last_hidden_state, dim=-1)).mean())
                       for b in test)

    assert err(q_mixed) < 0.9 * err(q_uniform)
