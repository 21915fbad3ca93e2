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
