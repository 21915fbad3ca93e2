"""A tied pair (token embedding + lm_head quantized on one grid) is one set of codes after ``lb.load``,
as after ``lb.freeze``: one storage in memory, not a copy per module.

Oracles: the storages themselves (``untyped_storage().data_ptr()``), the bytes of all distinct
storages the model holds (the loaded model holds no more than the model that was saved, and less
than a model holding the codes twice), and the saved model's logits (bit-identical).
"""
from __future__ import annotations

import pytest
import torch

import lowbit as lb
from _archs import batches, build

pytest.importorskip("transformers")

_BUFFERS = ("weight_codes", "weight_scale", "weight_zero_point")


def _storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers (what it holds in memory)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        seen[(t.device.type, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("model_like", ["real", "meta"])
def test_tied_pair_is_one_tensor_after_load(model_like, tmp_path):
    m = build("gpt2", tied=True)
    b = batches()
    q = lb.recipes.get("w8a8", family="transformer").apply(m, b)
    assert lb.coverage(q).tied, "the recipe should keep the tie (both quantized on one grid)"
    emb, head = q.get_input_embeddings(), q.lm_head
    assert emb.weight_codes.untyped_storage().data_ptr() == head.weight_codes.untyped_storage().data_ptr()
    with torch.no_grad():
        ref = q(**b[0]).logits
    path = lb.save(q, tmp_path / "q.safetensors")

    if model_like == "meta":
        with torch.device("meta"):
            like = build("gpt2", tied=True)
    else:
        like = build("gpt2", tied=True)
    q2 = lb.load(path, like)
    emb2, head2 = q2.get_input_embeddings(), q2.lm_head
    for name in _BUFFERS:
        a, c = getattr(emb2, name), getattr(head2, name)
        assert a.untyped_storage().data_ptr() == c.untyped_storage().data_ptr(), name
    held, saved = _storage_bytes(q2), _storage_bytes(q)
    assert held <= saved, f"the loaded model holds {held - saved} bytes more than the model that was saved"
    with torch.no_grad():
        assert torch.equal(q2(**b[0]).logits, ref)
