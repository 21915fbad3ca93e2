"""Quantized embedding tables export as DequantizeLinear -> Gather, and ONNX Runtime reads the same rows."""
import numpy as np
import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.export import export_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(100, 32)
        self.fc = nn.Linear(32, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids))


IDS = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spec", [lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)),
                                  lb.QuantSpec(bits=4, symmetric=False, granularity=lb.PerGroup(16))])
def test_onnx_runtime_gathers_the_dequantized_rows(tmp_path, helpers, spec):
    q = lb.freeze(lb.quantize(Bag(), weights=lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)), embeddings=spec))
    path = tmp_path / "e.onnx"
    info = export_onnx(q, IDS, path)
    assert "emb" in info.layers
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "Gather" in ops and ops.count("DequantizeLinear") >= 2
    inits = {t.name: t for t in graph.initializer}
    gather = next(n for n in graph.node if n.op_type == "Gather")
    dq = next(n for n in graph.node if gather.input[0] in n.output)
    assert dq.op_type == "DequantizeLinear"
    want = onnx.TensorProto.INT4 if spec.bits == 4 and spec.signed else onnx.TensorProto.INT8
    assert inits[dq.input[0]].data_type == want
    # the rows ONNX Runtime gathers, through the Linear: within float32 rounding of lowbit's model
    out = helpers.run_onnx(path, IDS)[0]
    np.testing.assert_allclose(out, q(IDS).detach().numpy(), rtol=0, atol=1e-5)


def test_unfrozen_table_is_refused_with_its_name(tmp_path):
    q = lb.quantize(Bag(), embeddings=lb.QuantSpec(bits=8))
    lb.freeze(q)
    q.emb.frozen = False
    with pytest.raises(ValueError, match="emb"):
        export_onnx(q, IDS, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
