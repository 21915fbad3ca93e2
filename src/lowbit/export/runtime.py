"""Run an exported model with ONNX Runtime, as a drop-in ``nn.Module``.

``ort_module(q, example_inputs)`` exports ``q`` (:func:`lowbit.export.export_onnx`), opens an
ONNX Runtime session on it and returns an :class:`OrtModule`: called with the same arguments as
``q``, it returns the same structure (a tensor, a tuple, a Hugging Face ``ModelOutput``...), so it
can replace ``q`` inside a larger model (e.g. the transformer of a ``SentenceTransformer``).

ONNX Runtime's graph optimizer fuses ``DequantizeLinear(weight) -> MatMul`` into ``MatMulNBits``
(4-bit and 8-bit weights). Its default ``accuracy_level`` 4 then quantizes the *activations* to
int8 per block of 32 inside the kernel, a different model from lowbit's; ``exact=True`` (default)
sets ``session.qdq_matmulnbits_accuracy_level = 1`` (float32 activations), which computes what
lowbit computes, to float32 rounding.

On x86 CPUs whose U8S8 int8 GEMM saturates (no VNNI, see :mod:`lowbit.integer.cpu`), lowbit's
sessions also set ``session.x64quantprecision = 1``: ONNX Runtime then rewrites ``int8`` weights that
need more than 7 bits to ``uint8`` and runs its exact U8U8 kernels. (ONNX Runtime 1.32 applies it on
VNNI CPUs too, where it only costs speed, so it is not set there.) The files lowbit exports are
exact without it (their format is chosen per layer); it covers a file written with
``int8_format="u8s8"`` or by another tool.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..integer.cpu import u8s8_exact_here
from .onnx_export import _split_inputs, export_onnx, run_eval

__all__ = ["OrtModule", "ort_module", "session_options", "compare_with_onnx"]

MATMULNBITS_ACCURACY = "session.qdq_matmulnbits_accuracy_level"
X64_PRECISION = "session.x64quantprecision"


def session_options(threads: int | None = None, exact: bool = True):
    """``onnxruntime.SessionOptions`` for lowbit graphs (see the module docstring)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.add_session_config_entry(MATMULNBITS_ACCURACY, "1" if exact else "4")
    if not u8s8_exact_here():
        so.add_session_config_entry(X64_PRECISION, "1")
    so.log_severity_level = 3
    return so


class OrtModule(nn.Module):
    """An ONNX Runtime session called like the torch model it was exported from.

    Positional and keyword tensors are matched to the graph's inputs (by position, or by name);
    other keyword arguments (``return_dict=True``, ...) are ignored. Outputs come back as torch
    tensors in the structure the torch model returned (``out_spec``, a pytree spec recorded at
    export). ``config`` (a Hugging Face model's) is kept as ``.config`` for wrappers that read it.
    """

    def __init__(self, path: str | os.PathLike, out_spec=None, threads: int | None = None, exact: bool = True,
                 config=None) -> None:
        super().__init__()
        if config is not None:  # a Hugging Face model's config: wrappers (SentenceTransformer) read it
            self.config = config
        import onnxruntime as ort

        self.path = str(path)
        self.session = ort.InferenceSession(self.path, session_options(threads, exact),
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.out_spec = out_spec

    def forward(self, *args, **kwargs):
        feed = {}
        for name, value in zip(self.input_names, args):
            feed[name] = value
        for name, value in kwargs.items():
            if name in self.input_names:
                feed[name] = value
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"inputs {missing} are missing; the graph takes {self.input_names}")
        feed = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in feed.items()}
        outs = [torch.from_numpy(o) for o in self.session.run(self.output_names, feed)]
        if self.out_spec is None:
            return outs[0] if len(outs) == 1 else tuple(outs)
        return pytree.tree_unflatten(outs, self.out_spec)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, inputs={self.input_names}, outputs={self.output_names}"


def ort_module(q: nn.Module, example_inputs, *, path: str | os.PathLike | None = None,
               threads: int | None = None, exact: bool = True, opset: int | None = None,
               integer: bool = False, int8_format: str | None = None) -> OrtModule:
    """Export ``q`` and return an :class:`OrtModule` that runs it with ONNX Runtime.

    ``path``: where to keep the ``.onnx`` file (default: a temporary file, removed when the session
    has loaded it). ``threads``: ONNX Runtime intra-op threads (default: its own choice).
    ``integer``: int8 ``MatMulInteger`` for the Linear layers that allow it (see
    :func:`lowbit.export.export_onnx`): the fast form. ``int8_format``: see
    :func:`lowbit.export.export_onnx`; by default the fastest format that is exact on this CPU
    (the file is written for this machine, ``portable=False``).
    """
    args, kwargs = _split_inputs(example_inputs)
    reference = run_eval(q, args, kwargs)
    flat, spec = pytree.tree_flatten(reference)
    if not all(isinstance(t, torch.Tensor) for t in flat):
        spec = None
    elif isinstance(reference, Mapping) and any(v is None for v in reference.values()):
        spec = None
    if path is not None:
        export_onnx(q, example_inputs, path, opset=opset, integer=integer, int8_format=int8_format, portable=False)
        return OrtModule(path, spec, threads, exact, getattr(q, "config", None))
    with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as tmp:
        file = os.path.join(tmp, "model.onnx")
        export_onnx(q, example_inputs, file, opset=opset, integer=integer, int8_format=int8_format, portable=False)
        module = OrtModule(file, spec, threads, exact, getattr(q, "config", None))
    return module


def compare_with_onnx(q: nn.Module, path: str | os.PathLike, inputs, *, threads: int | None = None,
                      exact: bool = True) -> dict:
    """Run ``q`` and the ONNX file ``path`` (ONNX Runtime) on ``inputs`` (one batch: a tensor, a
    tuple or a dict) and compare their first outputs: ``{"max_abs_diff", "rel_l2"
    (||onnx - q|| / ||q||), "max_abs" (of q's output), "shape"}``."""
    args, kwargs = _split_inputs(inputs)
    module = OrtModule(path, None, threads, exact)
    ref = run_eval(q, args, kwargs)
    got = module(*args, **kwargs)
    ref = pytree.tree_flatten(ref)[0][0]
    got = got[0] if isinstance(got, tuple) else got
    diff = (got.float() - ref.float())
    return {"max_abs_diff": float(diff.abs().max()), "rel_l2": float(diff.norm() / ref.float().norm().clamp_min(1e-30)),
            "max_abs": float(ref.abs().max()), "shape": list(ref.shape)}
