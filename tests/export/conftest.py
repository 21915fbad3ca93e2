"""Helpers for the export tests: run a graph in ONNX Runtime, and compare the codes its
QuantizeLinear nodes produce with lowbit's quantization of the same tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit as lb

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _session(model_or_path, level: str = "all"):
    from lowbit.export import session_options

    so = session_options(threads=1)
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _feed(session, inputs) -> dict:
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, dict):
        return {k: v.numpy() for k, v in inputs.items() if k in names}
    return {n: v.numpy() for n, v in zip(names, inputs)}


def run_onnx(path, inputs, level: str = "all") -> list[np.ndarray]:
    s = _session(path, level)
    return s.run(None, _feed(s, inputs))


def run_reference(path, inputs) -> list[np.ndarray]:
    """The graph run by ``onnx.reference.ReferenceEvaluator`` (numpy; no CPU-specific int8 kernels)."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    names = evaluator.input_names
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    feed = {k: v.numpy() for k, v in inputs.items() if k in names} if isinstance(inputs, dict) else {
        n: v.numpy() for n, v in zip(names, inputs)}
    return evaluator.run(None, feed)


def onnx_quantize_inputs(path, inputs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (x, codes)}``: what each ``<layer>/QuantizeLinear`` node receives and produces when
    ONNX Runtime runs the graph (basic optimizations, so no node is fused away)."""
    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in model.graph.input})
    wanted = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.name.endswith("/QuantizeLinear"):
            wanted[node.name.rsplit("/", 1)[0]] = (node.input[0], node.output[0])
    names = [n for pair in wanted.values() for n in pair]
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
            existing.add(name)
    s = _session(model, "basic")
    outs = dict(zip(names, s.run(names, _feed(s, inputs))))
    return {layer: (outs[x], outs[c]) for layer, (x, c) in wanted.items()}


def compare_codes(q, path, inputs) -> tuple[int, int]:
    """``(max |code difference|, QuantizeLinear nodes compared)`` between ONNX Runtime's QuantizeLinear and
    lowbit's quantization (``lb.ops.quantize`` with the layer's grid, calibrated or fitted to the
    tensor) of the same tensors, at every quantized layer of the graph."""
    seen = onnx_quantize_inputs(path, inputs)
    layers = dict(lb.quant_layers(q))
    expected = [n for n, layer in layers.items() if layer.input_quant is not None and layer.input_quant.enabled]
    # layers that read the same tensor with the same dynamic grid (query, key, value) share one
    # QuantizeLinear: the exporter's optimizer merges identical computations
    assert set(seen) <= set(expected), sorted(set(seen) - set(expected))
    worst = 0
    for name, (x, codes) in seen.items():
        aq = layers[name].input_quant
        xt = torch.from_numpy(x)
        s, z = lb.ops.choose_qparams(xt, aq.spec, "minmax") if aq.spec.dynamic else (aq.scale, aq.zero_point)
        ours = lb.ops.quantize(xt, aq.spec, s, z).numpy().astype(np.int64)
        worst = max(worst, int(np.abs(ours - codes.astype(np.int64)).max()))
    return worst, len(seen)


@pytest.fixture
def helpers():
    class H:
        pass

    h = H()
    h.run_onnx, h.onnx_quantize_inputs, h.compare_codes = run_onnx, onnx_quantize_inputs, compare_codes
    h.run_reference = run_reference
    return h
