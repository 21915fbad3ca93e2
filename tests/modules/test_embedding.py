"""QuantEmbedding: a lookup table of integer rows, fake-quantized until frozen, dequantized per row after."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit as lb
from lowbit import ops
from lowbit.modules import QuantEmbedding

ROW8 = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))
G4 = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerGroup(8))


class Tagger(nn.Module):
    def __init__(self, vocab=40, dim=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Embedding(12, dim)
        self.fc = nn.Linear(dim, 5)

    def forward(self, ids):
        return self.fc(self.emb(ids) + self.pos(torch.arange(ids.shape[-1])))


def _ids(vocab=40, shape=(3, 9), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _oracle_table(w, spec):
    """The table on ``spec``'s grid, from ops alone (range from min/max of the whole table / rows / groups)."""
    s, z = ops.choose_qparams(w, spec)
    return ops.fake_quantize(w, spec, s, z)


@pytest.mark.parametrize("spec", [ROW8, G4, lb.QuantSpec(bits=4), lb.QuantSpec(bits=3, granularity=lb.PerGroup(4))])
def test_lookup_is_the_quantized_table_and_freezing_keeps_it_exactly(spec):
    m = Tagger()
    q = lb.quantize(m, embeddings=spec)
    assert isinstance(q.emb, QuantEmbedding) and isinstance(q.pos, nn.Embedding) is False
    ids = _ids()
    table = _oracle_table(m.emb.weight.detach(), spec)
    assert torch.equal(q.emb(ids), F.embedding(ids, table))
    before = q(ids)
    lb.freeze(q)
    assert q.emb.frozen and "weight" not in q.emb._parameters
    assert torch.equal(q.emb(ids), F.embedding(ids, table))      # row lookup == full-table dequantization
    assert torch.equal(q(ids), before)
    assert torch.equal(q.emb.weight, table)                      # .weight reads back the dequantized table


def test_frozen_codes_are_stored_packed_and_small():
    m = Tagger(vocab=64, dim=32)
    q = lb.freeze(lb.quantize(m, embeddings=G4))
    assert q.emb.weight_codes.dtype == torch.uint8 and q.emb.weight_codes.numel() == 64 * 32 // 2
    assert q.emb.weight_scale.shape == (64, 4)                   # one scale per row group of 8
    q8 = lb.freeze(lb.quantize(m, embeddings=ROW8))
    assert q8.emb.weight_codes.shape == (64, 32) and q8.emb.weight_scale.shape == (64,)


def test_odd_row_width_packed_rows_fall_back_to_the_whole_table():
    m = nn.Sequential(nn.Embedding(10, 7))
    spec = lb.QuantSpec(bits=4, granularity=lb.PerChannel(0))
    q = lb.freeze(lb.quantize(m, embeddings=spec))
    ids = torch.tensor([[0, 9, 3], [3, 3, 1]])
    assert torch.equal(q(ids), F.embedding(ids, _oracle_table(m[0].weight.detach(), spec)))


def test_default_keeps_embeddings_float_and_listed():
    q = lb.quantize(Tagger())
    assert type(q.emb) is nn.Embedding and "emb" in q.lowbit_info.skipped
    assert q.lowbit_info.quantized_embeddings == [] and q.lowbit_info.embeddings is None
    q2 = lb.quantize(Tagger(), embeddings=ROW8, exclude=["pos"])
    assert q2.lowbit_info.quantized_embeddings == ["emb"] and type(q2.pos) is nn.Embedding
    assert q2.lowbit_info.as_dict()["quantized_embeddings"] == ["emb"]


def test_embeddings_alone_can_be_quantized_and_frozen():
    m = nn.Sequential(nn.Embedding(20, 8))
    q = lb.freeze(lb.quantize(m, embeddings=ROW8))
    ids = torch.arange(20)
    assert torch.equal(q(ids), _oracle_table(m[0].weight.detach(), ROW8))


def test_bad_input():
    with pytest.raises(TypeError, match="embeddings"):
        lb.quantize(Tagger(), embeddings="int8")
    with pytest.raises(ValueError, match="embeddings"):
        lb.quantize(Tagger(), embeddings=lb.QuantSpec(bits=8, dynamic=True, granularity=lb.PerToken()))
    with pytest.raises(ValueError, match="embeddings"):
        lb.quantize(Tagger(), embeddings=lb.QuantSpec(bits=8, granularity=lb.PerGroup(8, axis=0)))
    m = Tagger()
    m.emb.max_norm = 1.0
    q = lb.quantize(m, embeddings=ROW8)
    assert type(q.emb) is nn.Embedding and "max_norm" in q.lowbit_info.skipped["emb"]
    frozen = lb.freeze(lb.quantize(Tagger(), embeddings=ROW8))
    with pytest.raises(IndexError):
        frozen.emb(torch.tensor([40]))
    with pytest.raises(ValueError, match="already quantized"):
        lb.quantize(frozen)


def test_qat_gradient_reaches_the_float_table():
    q = lb.quantize(Tagger(), embeddings=ROW8).train()
    q(_ids()).sum().backward()
    assert q.emb.weight.grad is not None and q.emb.weight.grad.abs().sum() > 0
