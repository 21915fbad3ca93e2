"""lb.quantize accounts for every layer (lb.coverage) and settles tied weights before anything changes one."""
from __future__ import annotations

import pytest
import safetensors
import torch
from torch import nn

import lowbit as lb


class TinyLM(nn.Module):
    """Embedding -> Linear -> LayerNorm -> lm_head, lm_head tied to the embedding (like GPT-2)."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 32, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.norm(torch.relu(self.proj(self.embed(ids)))))


def _ids(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 32, (2, 7), generator=g) for _ in range(n)]


def test_every_module_listed_with_reason():
    torch.manual_seed(0)
    q = lb.quantize(TinyLM(tie=False), exclude=["proj"])
    cov = lb.coverage(q)
    assert cov.quantized == {"lm_head": "QuantLinear"}
    assert cov.float["proj"] == "excluded by exclude"
    assert "Embedding" in cov.float["embed"] and "LayerNorm" in cov.float["norm"]
    assert cov.linear_like_float == []             # the user excluded proj: no warning
    assert set(cov.as_dict()) == {"quantized", "float", "linear_like_float", "tied", "untied", "aliases"}
    with pytest.raises(ValueError, match="not returned by lb.quantize"):
        lb.coverage(TinyLM())


def test_tied_lm_head_with_float_embedding_is_untied_and_float_table_kept():
    torch.manual_seed(0)
    m = TinyLM()
    table = m.embed.weight.detach().clone()
    q = lb.quantize(m, weights=lb.QuantSpec(bits=4, granularity=lb.PerChannel(0)))
    cov = lb.coverage(q)
    assert "lm_head" in cov.untied and q.lm_head.weight is not q.embed.weight
    lb.gptq(q, _ids())                               # rewrites lm_head's master weight
    assert torch.equal(q.embed.weight, table)        # the float table of q is unchanged
    assert torch.equal(m.embed.weight, table) and m.lm_head.weight is m.embed.weight   # and the user's model


def test_tied_pair_on_one_grid_is_one_tensor_stored_once(tmp_path):
    torch.manual_seed(0)
    m = TinyLM()
    spec = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))
    q = lb.quantize(m, weights=spec, embeddings=spec)
    assert lb.coverage(q).tied == [["embed.weight", "lm_head.weight"]]
    lb.freeze(q)
    assert q.lm_head.weight_codes is q.embed.weight_codes
    path = lb.save(q, tmp_path / "q.safetensors")
    with safetensors.safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith("weight_codes") for k in keys) == 1 + 1   # proj's codes + the tied pair's, once
    q2 = lb.load(path, TinyLM())
    x = _ids(1)[0]
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
