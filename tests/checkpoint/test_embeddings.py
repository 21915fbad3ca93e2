"""lb.save / lb.load with quantized embedding tables: bit-identical round trips, small files, format versions."""
import json

import pytest
import safetensors.torch
import torch
from torch import nn

import lowbit as lb
from lowbit.checkpoint import read_quant_map
from lowbit.modules import QuantEmbedding

ROW8 = lb.QuantSpec(bits=8, granularity=lb.PerChannel(0))
G4 = lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerGroup(16))
W4 = lb.QuantSpec(bits=4, granularity=lb.PerGroup(16))


class Bag(nn.Module):
    def __init__(self, vocab=300, dim=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, 4)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


IDS = torch.randint(0, 300, (5, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("spec", [ROW8, G4])
def test_round_trip_is_bit_identical_and_the_table_is_stored_as_codes(tmp_path, spec):
    m = Bag()
    q = lb.freeze(lb.quantize(m, weights=W4, embeddings=spec))
    path = lb.save(q, tmp_path / "q.safetensors")
    q2 = lb.load(path, m)
    assert isinstance(q2.emb, QuantEmbedding) and q2.emb.frozen
    assert torch.equal(q2(IDS), q(IDS))
    assert q2.lowbit_info.quantized_embeddings == ["emb"] and q2.lowbit_info.embeddings == spec
    stored = safetensors.torch.load_file(str(path))
    assert stored["emb.weight_codes"].dtype in (torch.int8, torch.uint8)
    assert "emb.weight" not in stored
    qmap = read_quant_map(path)
    assert qmap["format_version"] == 3 and list(qmap["embeddings"]) == ["emb"]
    # codes (int8, or int4 two per byte) + float32 scales + one-byte zero points where not implied (symmetric)
    table_bytes = sum(t.numel() * t.element_size() for k, t in stored.items() if k.startswith("emb."))
    params = 300 if spec.bits == 8 else 300 * 32 // 16
    expected = 300 * 32 * spec.bits // 8 + params * 4 + (0 if spec.symmetric else params)
    assert table_bytes == expected


def test_unfrozen_table_round_trips_too(tmp_path):
    m = Bag()
    q = lb.quantize(m, embeddings=G4)
    q2 = lb.load(lb.save(q, tmp_path / "u.safetensors"), m)
    assert not q2.emb.frozen and torch.equal(q2(IDS), q(IDS))


def test_a_version_2_file_without_embeddings_still_loads(tmp_path):
    m = Bag()
    q = lb.freeze(lb.quantize(m, weights=W4))
    path = lb.save(q, tmp_path / "v3.safetensors")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    qmap = json.loads(header["__metadata__"]["lowbit"])
    assert qmap["format_version"] == 3 and "embeddings" not in qmap      # nothing written when there are none
    qmap["format_version"] = 2                                           # exactly what lowbit wrote before
    old = tmp_path / "v2.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(str(path)), str(old),
                                metadata={"format": "lowbit", "lowbit": json.dumps(qmap)})
    assert read_quant_map(old)["embeddings"] == {}
    assert torch.equal(lb.load(old, m)(IDS), q(IDS))


def test_model_like_without_the_embedding_is_refused(tmp_path):
    q = lb.freeze(lb.quantize(Bag(), embeddings=ROW8))
    path = lb.save(q, tmp_path / "q.safetensors")
    other = Bag(dim=32)
    other.emb = nn.Linear(2, 32)
    with pytest.raises(ValueError, match="emb"):
        lb.load(path, other)
    with pytest.raises(ValueError, match="shape"):
        lb.load(path, Bag(vocab=200))
