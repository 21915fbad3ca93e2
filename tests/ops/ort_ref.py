"""ONNX Runtime as the oracle: QuantizeLinear / DequantizeLinear (opset 21) on tiny graphs.

Integer outputs are read back exactly through ``DequantizeLinear(q, scale=1)``, which works for
every integer type (ONNX Runtime cannot hand int4 tensors to NumPy).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from lowbit import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

_TYPES = {(8, True): TensorProto.INT8, (8, False): TensorProto.UINT8, (4, True): TensorProto.INT4,
          (4, False): TensorProto.UINT4, (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16}


def onnx_type(spec: QuantSpec) -> int:
    return _TYPES[(spec.bits, spec.signed)]


def _attrs(spec: QuantSpec, ndim: int, shape) -> dict:
    g = spec.granularity
    if isinstance(g, PerTensor):
        return {}
    if isinstance(g, PerChannel):
        return {"axis": g.axis}
    if isinstance(g, PerGroup):
        return {"axis": g.axis, "block_size": g.size}
    assert isinstance(g, PerToken)
    return {"axis": ndim - 1, "block_size": shape[-1]}


def _session(nodes, inputs, outputs, inits, opset=21):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset <= 21 else 11
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the ops as written
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _params(spec, scale: torch.Tensor, zero_point: torch.Tensor):
    s = scale.detach().to(torch.float32).numpy()
    z = zero_point.detach().to(torch.int64).numpy()
    return [helper.make_tensor("s", TensorProto.FLOAT, s.shape, s.ravel().tolist()),
            helper.make_tensor("zp", onnx_type(spec), z.shape, z.ravel().tolist()),
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])]


def qdq(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor):
    """ONNX Runtime's ``(codes, QuantizeLinear -> DequantizeLinear)`` of float32 ``x``."""
    xs = x.detach().to(torch.float32).numpy()
    attrs = _attrs(spec, xs.ndim, xs.shape)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "one"], ["codes"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)]
    io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, xs.shape)  # noqa: E731
    sess = _session(nodes, [io("x")], [io("codes"), io("y")], _params(spec, scale, zero_point))
    codes, y = sess.run(None, {"x": xs})
    return torch.from_numpy(codes.astype(np.int64)), torch.from_numpy(y)


def dequantize(q: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor):
    """ONNX Runtime's DequantizeLinear of the integer codes ``q`` (fed in exactly via Q(scale=1))."""
    qs = q.to(torch.float32).numpy()
    attrs = _attrs(spec, qs.ndim, qs.shape)
    zero = helper.make_tensor("zero", onnx_type(spec), [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["qf", "one", "zero"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)]
    io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, qs.shape)  # noqa: E731
    sess = _session(nodes, [io("qf")], [io("y")], _params(spec, scale, zero_point) + [zero])
    (y,) = sess.run(None, {"qf": qs})
    return torch.from_numpy(y)


def decode_packed(packed: torch.Tensor, bits: int, signed: bool, numel: int) -> torch.Tensor:
    """Let ONNX Runtime read bytes as a packed (U)INT4 or (U)INT2 tensor: the codes, in ONNX's layout."""
    t = onnx.TensorProto()
    types = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
             (2, True): TensorProto.INT2, (2, False): TensorProto.UINT2}
    t.name, t.data_type = "p", types[(bits, signed)]
    t.dims.append(numel)
    t.raw_data = packed.numpy().tobytes()
    nodes = [helper.make_node("DequantizeLinear", ["p", "one"], ["codes"])]
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    out = helper.make_tensor_value_info("codes", TensorProto.FLOAT, [numel])
    sess = _session(nodes, [], [out], [t, one], opset=21 if bits == 4 else 25)  # INT2: opset 25
    (codes,) = sess.run(None, {})
    return torch.from_numpy(codes.astype(np.int64))
