"""``torch.compile(fullgraph=True)`` of frozen models: no graph break (fullgraph raises on one), same
outputs as eager. Static and dynamic activations, int8/int4 weights, a CNN and transformers."""
import pytest
import torch

import lowbit as lb
from lowbit import recipes, zoo
from lowbit.quantize import quant_layers

transformers = pytest.importorskip("transformers")


def _compiled_matches(model, *args, backend="eager", **kwargs):
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(*args, **kwargs)
        out = torch.compile(model, fullgraph=True, backend=backend)(*args, **kwargs)
    ref = getattr(ref, "last_hidden_state", getattr(ref, "logits", ref))
    out = getattr(out, "last_hidden_state", getattr(out, "logits", out))
    return torch.equal(ref, out), float((ref - out).abs().max())


def test_frozen_cnn_static_w8a8_compiles_whole():
    model, data = zoo.get("digits")
    q = lb.quantize(model, weights=lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(bits=8, symmetric=False))
    with lb.calibrate(q):
        for x in zoo.calibration_batches(data):
            q(x)
    lb.freeze(q)
    same, diff = _compiled_matches(q, data.x_test[:32], backend="aot_eager")
    assert same, diff


def _tiny_bert():
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic", "w4g32"])
def test_frozen_transformer_compiles_whole(recipe):
    model = _tiny_bert()
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 120, (4, 12), generator=gen),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(3)]
    q = recipes.get(recipe, "transformer").apply(model, batches, freeze=True)
    same, diff = _compiled_matches(q, **batches[0])
    assert same, diff


def test_frozen_int4_decoder_compiles_whole_with_the_kernel():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    q = lb.quantize(transformers.LlamaForCausalLM(cfg).eval(), weights=lb.QuantSpec(4, granularity=lb.PerGroup(32)))
    lb.freeze(q, kernel="auto")
    assert {layer.runtime for _, layer in quant_layers(q)} == {"int4"}
    same, diff = _compiled_matches(q, torch.randint(0, 128, (1, 5)))
    assert same, diff


def test_frozen_model_runs_under_inference_mode():
    model, data = zoo.get("digits")
    q = lb.freeze(lb.quantize(model, weights=lb.QuantSpec(bits=4, granularity=lb.PerGroup(16))))
    with torch.no_grad():
        ref = q(data.x_test[:8])
    with torch.inference_mode():
        assert torch.equal(q(data.x_test[:8]), ref)
        assert torch.equal(q(data.x_test[:8]), ref)
