"""``export_onnx(q, example_inputs, path)``: a frozen quantized model as a QDQ ONNX graph.

How: a copy of ``q`` whose quantized layers are replaced by their :class:`~lowbit.export.layers.ExportLayer`
is traced by ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript), with the lowbit
operators translated to ``QuantizeLinear``/``DequantizeLinear`` (:mod:`lowbit.export.translate`);
quantized embedding tables become ``DequantizeLinear -> Gather`` (:class:`~lowbit.export.layers.ExportEmbedding`);
every other module goes through torch's own ONNX translation. The graph is then finished:
4-bit weight codes become packed INT4/UINT4 initializers (``DequantizeLinear`` with ``block_size``
for groups; opset 21), the nodes of each quantized layer are named after it (``"fc1/MatMul"``), and
``onnx.checker`` validates it before it is written atomically (temporary file + ``os.replace``: a
failed export leaves no file, and an existing file is only replaced by a complete one).

The exported graph computes what the lowbit model computes (ONNX Q/DQ semantics are lowbit's):
fake-quantized in torch and QDQ in ONNX Runtime agree to float32 rounding.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.atomic import atomic_write
from ..integer.cpu import check_format
from ..modules.tree import set_module
from ..quantize import quant_embeddings, quant_layers
from .layers import BLOCKED_OPSET, ExportEmbedding, ExportLayer, export_embedding, export_layer

__all__ = ["export_onnx", "ExportInfo", "DEFAULT_OPSET"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 21
_MIN_OPSET = 18  # torch's ONNX exporter


@dataclass
class ExportInfo:
    """What :func:`export_onnx` wrote."""

    path: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    layers: list[str] = field(default_factory=list)       # quantized layers (and tables) written as QDQ (or integer ops)
    integer: list[str] = field(default_factory=list)      # layers written with MatMulInteger (integer=True)
    int4: list[str] = field(default_factory=list)         # layers whose weights are INT4/UINT4
    size_bytes: int = 0
    int8_formats: dict[str, str] = field(default_factory=dict)   # layer -> "u8s8" | "u8u8" (lowbit.integer.cpu)

    def as_dict(self) -> dict:
        return {"path": self.path, "opset": self.opset, "inputs": self.inputs, "outputs": self.outputs,
                "layers": list(self.layers), "integer": list(self.integer), "int4": list(self.int4),
                "int8_formats": dict(self.int8_formats), "size_bytes": self.size_bytes}


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"example_inputs: a dict holds keyword arguments, its keys must be str, got {bad[0]!r}")
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError("example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword "
                    f"arguments, got {type(example_inputs).__name__}")


def _dynamic_shapes(args: tuple, kwargs: dict):
    """Every dimension of every tensor input is ``Dim.AUTO``: torch keeps dynamic what the model
    allows (batch, sequence, length) and static what it fixes (features, channels)."""
    auto = torch.export.Dim.AUTO

    def spec(v):
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        return {i: auto for i in range(v.dim())}

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(v) for v in args)


def run_eval(model: nn.Module, args: tuple, kwargs: dict):
    """``model(*args, **kwargs)`` in eval mode without gradients; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        model.train(was_training)


def _output_names(model: nn.Module, args: tuple, kwargs: dict) -> list[str] | None:
    out = run_eval(model, args, kwargs)
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, Mapping):
        names = [k for k, v in out.items() if v is not None]
        if all(isinstance(out[k], torch.Tensor) for k in names):
            return [str(k) for k in names]
        return None
    if isinstance(out, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in out):
        return [f"output_{i}" for i in range(len(out))]
    return None


def check_exporter() -> None:
    """Raise ``RuntimeError`` on a torch whose ONNX exporter lowbit does not support.

    lowbit uses ``torch.onnx.export(dynamo=True, custom_translation_table=...)`` with
    ``torch.export.Dim.AUTO``; before torch 2.7 these are missing (2.4, 2.5) or fail on dynamic
    batch sizes (2.6). Tested: 2.7.1, 2.8.0, 2.13.0.
    """
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) < (2, 7):
        raise RuntimeError(f"ONNX export needs torch >= 2.7 (its dynamo exporter); this is torch {torch.__version__}: "
                           "upgrade torch (pip install 'torch>=2.7') to export or to run on ONNX Runtime")


@contextlib.contextmanager
def _module_stack() -> list:
    """Track which modules are running (to name the one where tracing failed)."""
    stack: list = []

    def enter(module, args):
        stack.append(module)

    def leave(module, args, output):
        if stack:
            stack.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    try:
        yield stack
    finally:
        pre.remove()
        post.remove()


@contextlib.contextmanager
def _quiet_exporter():
    """torch's exporter and onnxscript's optimizer log every step at INFO/WARNING; keep errors only."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _finish(model_proto, exported: dict[str, ExportLayer]) -> None:
    """4-bit initializers, node names, metadata (in place on the ModelProto)."""
    import onnx
    from onnx import TensorProto

    graph = model_proto.graph
    # the traced graph may share identical initializers between layers (the optimizer deduplicates
    # them), so each 4-bit weight's DequantizeLinear gets fresh INT4/UINT4 initializers of its own
    fresh: dict[str, tuple[onnx.TensorProto, list]] = {}
    for layer_name, layer in exported.items():
        if not layer.int4:
            continue
        node = _weight_dequantize_node(graph, layer_name)
        for slot, key in ((0, "weight_codes"), (2, "weight_zero_point")):
            init = layer.int4[key]
            tensor = onnx.helper.make_tensor(f"{layer_name}.{key}", TensorProto.INT4 if init.signed else TensorProto.UINT4,
                                             list(init.dims), init.packed.numpy().tobytes(), raw=True)
            placeholder = f"__lowbit_int4_{len(fresh)}"
            node.input[slot] = placeholder
            fresh[placeholder] = (tensor, node)
    if fresh:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        taken = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {
            o for n in graph.node for o in n.output}
        for placeholder, (tensor, node) in fresh.items():
            name = tensor.name
            while name in taken:
                name += "_int4"
            tensor.name = name
            taken.add(name)
            node.input[list(node.input).index(placeholder)] = name
            graph.initializer.append(tensor)
        names = {t.name for t in graph.initializer}
        keep_vi = [v for v in graph.value_info if v.name not in names]
        del graph.value_info[:]
        graph.value_info.extend(keep_vi)
    # name the nodes of each quantized layer after it
    layer_names = set(exported)
    counts: dict[str, int] = {}
    for node in graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes is None:
            continue
        owner = next((s for s in reversed(_parse_scopes(scopes)) if s in layer_names), None)
        if owner is None:
            continue
        base = f"{owner}/{node.op_type}"
        counts[base] = counts.get(base, 0) + 1
        node.name = base if counts[base] == 1 else f"{base}_{counts[base] - 1}"
    model_proto.producer_name = "lowbit"
    from .. import __version__ as _v  # noqa: PLC0415 (lowbit/__init__ is loaded by now)

    model_proto.producer_version = _v


def _weight_dequantize_node(graph, layer_name: str):
    """The DequantizeLinear of ``layer_name``'s weight (its input is an initializer)."""
    inits = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        scopes = _parse_scopes(next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]"))
        if layer_name in scopes:
            return node
    raise RuntimeError(f"lowbit export: the weight DequantizeLinear of {layer_name!r} is not in the traced graph")


def _parse_scopes(text: str) -> list[str]:
    import ast

    try:
        out = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [s for s in out if isinstance(s, str)]


def export_onnx(q: nn.Module, example_inputs, path: str | os.PathLike, *, opset: int | None = None,
                dynamic_shapes=None, integer: bool = False, int8_format: str | None = None,
                portable: bool = True) -> ExportInfo:
    """Write the frozen quantized model ``q`` as a QDQ ONNX graph to ``path``; see the module docstring.

    Args:
        q: a model after ``lb.quantize`` and ``lb.freeze`` (it is not modified).
        example_inputs: one batch of model inputs, as for a calibration batch: a tensor, a tuple of
            positional arguments, or a dict of keyword arguments (a tokenizer's output).
        path: the ``.onnx`` file to write (its directory must exist).
        opset: ONNX opset (default 21; >= 18; 4-bit or grouped weights and per-token activations need 21).
        dynamic_shapes: passed to ``torch.onnx.export``; default: every dimension the model allows
            to vary (batch, sequence, length) is dynamic. Give examples with every such dimension
            at least 2 (torch keeps a dimension of size 1 static).
        integer: write Linear layers whose grids allow it (8-bit-or-less inputs per tensor or per
            token, weights with zero point 0 per tensor or per output channel) as
            ``QuantizeLinear -> MatMulInteger -> scale`` (ONNX Runtime's int8 GEMM) instead of QDQ
            around a float MatMul. Same outputs up to float32 rounding; not a QDQ graph.
        int8_format: how 8-bit weights read by 8-bit activations are stored (ONNX Runtime's int8
            kernels follow it): ``None`` (default; or the ``LOWBIT_INT8_FORMAT`` environment variable)
            picks per layer, ``"u8s8"`` keeps ``int8`` codes, ``"u8u8"`` writes ``uint8`` codes
            ``w + 128`` with zero point ``z_w + 128`` (the same weights). ``u8s8`` saturates in ONNX
            Runtime's default configuration on x86 CPUs without VNNI; see :mod:`lowbit.integer.cpu`.
        portable: the file may run on any CPU (default): ``None`` picks ``u8s8`` only where no pair
            of products can leave int16, else ``u8u8``. ``False``: for this machine (what
            :func:`lowbit.export.ort_module` and :func:`lowbit.integer.fast` use): ``u8s8`` where
            ONNX Runtime's U8S8 GEMM is exact here (VNNI, AMX, ARM).

    Returns an :class:`ExportInfo`. Raises ``ValueError`` naming the module for anything that cannot
    be exported; then no file is written.
    """
    if not isinstance(q, nn.Module):
        raise TypeError(f"q must be a torch.nn.Module, got {type(q).__name__}")
    check_exporter()
    check_format(int8_format)
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < _MIN_OPSET:
        raise ValueError(f"opset must be an int >= {_MIN_OPSET} (torch's ONNX exporter), got {opset!r}; 21 is the default")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    if not (path.parent if str(path.parent) else Path(".")).is_dir():
        raise ValueError(f"path: directory {str(path.parent)!r} does not exist; create it first")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'lowbit[onnx]'") from e
    from .translate import translation_table

    args, kwargs = _split_inputs(example_inputs)
    layers = quant_layers(q)
    if not layers and not quant_embeddings(q):
        raise ValueError("q has no quantized layer: run lb.quantize, lb.calibrate and lb.freeze first")
    model = copy.deepcopy(q).eval()
    exported: dict[str, ExportLayer | ExportEmbedding] = {}
    for name, table in quant_embeddings(model):
        new = export_embedding(name, table)
        if opset < BLOCKED_OPSET and (new.int4 or new.block_size):
            raise ValueError(f"cannot export embedding {name!r} at opset {opset}: 4-bit or grouped codes need opset "
                             f"{BLOCKED_OPSET}; pass opset={BLOCKED_OPSET}")
        set_module(model, name, new)
        exported[name] = new
    for name, layer in quant_layers(model):
        new = export_layer(name, layer, integer, int8_format, portable)
        if opset < BLOCKED_OPSET and (new.int4 or new.block_size or (new.input_qdq is not None and (
                new.input_qdq.spec.dynamic or new.input_qdq.spec.bits > 8))):
            raise ValueError(f"cannot export layer {name!r} at opset {opset}: 4-bit, grouped or 16-bit weights and "
                             f"dynamic activations need opset {BLOCKED_OPSET}; pass opset={BLOCKED_OPSET}")
        set_module(model, name, new)
        exported[name] = new
    names = {id(m): n for n, m in model.named_modules()}
    output_names = _output_names(q, args, kwargs)
    if dynamic_shapes is None:
        dynamic_shapes = _dynamic_shapes(args, kwargs)
    stack: list = []
    try:
        with _module_stack() as stack, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, verbose=False,
                                        opset_version=opset, dynamic_shapes=dynamic_shapes,
                                        output_names=output_names,
                                        custom_translation_table=translation_table(opset), report=False)
    except Exception as e:  # torch raises many kinds; name the module and keep the cause
        where = next((names[id(m)] for m in reversed(stack) if id(m) in names), None)
        at = f" in module {where!r} ({type(model.get_submodule(where)).__name__})" if where else ""
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        first = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
        raise ValueError(f"cannot export the model{at}: torch.onnx.export failed with "
                         f"{type(root).__name__}: {first}") from e
    proto = program.model_proto
    _finish(proto, exported)
    import onnx

    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"the exported graph is not valid ONNX: {e}") from e
    data = proto.SerializeToString()
    atomic_write(path, data)
    info = ExportInfo(path=str(path), opset=opset, inputs=[i.name for i in proto.graph.input],
                      outputs=[o.name for o in proto.graph.output], layers=list(exported),
                      integer=[n for n, layer in exported.items() if layer.integer],
                      int4=[n for n, layer in exported.items() if layer.int4], size_bytes=len(data),
                      int8_formats={n: layer.int8_format for n, layer in exported.items()
                                    if getattr(layer, "int8_format", None)})
    log.info("lowbit: wrote %s (%d quantized layers, %d bytes)", path, len(exported), len(data))
    return info
