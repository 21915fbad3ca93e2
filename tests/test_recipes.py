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
