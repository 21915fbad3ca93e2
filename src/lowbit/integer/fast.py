"""``fast(q)``: run a frozen quantized model fast on the CPU, computing what it computes.

Two backends, chosen by measurement (``benchmarks/bench_fast.py``: all-MiniLM-L6-v2, 512 sentences,
2 threads; ONNX Runtime is the fastest by far, so ``"auto"`` picks it when it can):

* ``"ort"``: the model exported with ``MatMulInteger`` for its int8-able Linear layers and QDQ for
  the rest (:func:`lowbit.export.export_onnx` with ``integer=True``) and run by ONNX Runtime
  (:func:`lowbit.export.ort_module`); needs ``example_inputs`` and the ``onnx`` extra.
* ``"torch"``: a copy of ``q`` in which every Linear with int8-able grids becomes a
  :class:`FastLinear`, an int8 x int8 -> int32 GEMM (``torch._int_mm``: oneDNN, VNNI/AMX) on
  lowbit's own codes; every other frozen layer keeps its float operation on a weight dequantized
  once (instead of unpacked at every call). No export and no new dependency, but on 2 cores
  ``_int_mm`` is only ~1.6x a float GEMM and the eager quantization around it costs as much.

:class:`FastLinear` quantizes its input exactly as the frozen layer does
(``q = clamp(round_half_even(x / s) + z, qmin, qmax)`` with the calibrated grid, or the grid of
:func:`lowbit.ops.range_to_qparams` fitted to each token / tensor for dynamic activations), then::

    a   = q - o                       (o = 128 for unsigned codes, so a fits int8; else 0)
    acc = a @ W_q^T + (o - z) * sum_k W_q[:, k]        exact int32 (W_q: int8 weight codes, zero point 0)
    y   = acc * s * s_w + b                            float32

which equals the fake-quantized ``(q - z) s @ (W_q s_w)^T + b`` up to float32 rounding (the float
model sums the same products in another order). Dynamic ranges are taken over all values (the
frozen layer ignores non-finite ones; a NaN or inf input gives a NaN output either way).
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..modules import QuantLayer
from ..modules.tree import set_module
from ..ops.integer_math import int_matmul
from ..ops.qparams import range_to_qparams
from ..quantize import frozen_quant_layers, quant_layers
from ..spec import PerChannel, PerTensor, PerToken
from .cpu import check_format

__all__ = ["fast", "FastLinear", "DequantizedLayer", "fast_reason", "BACKENDS"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "ort")


def fast_reason(layer: QuantLayer) -> str | None:
    """Why ``layer`` cannot be a :class:`FastLinear` (``None`` if it can)."""
    if layer.integer_kind != "linear":
        return "not a Linear"
    if not layer.frozen:
        return "not frozen"
    aq = layer.input_quant
    if aq is None or not aq.enabled or not aq.calibrated:
        return "weight-only (float input)"
    if aq.spec.bits > 8:
        return f"{aq.spec.bits}-bit input codes do not fit int8"
    g = aq.spec.granularity
    if not (isinstance(g, PerTensor) or (isinstance(g, PerToken) and aq.spec.dynamic)):
        return f"input granularity {type(g).__name__}"
    ws = layer.weight_quant.spec
    if ws.bits > 8 or not isinstance(ws.granularity, (PerTensor, PerChannel)):
        return f"weights {ws}: needs 8-bit-or-less codes per tensor or per output channel"
    if isinstance(ws.granularity, PerChannel) and ws.granularity.axis % 2 != 0:
        return "weights per input channel"
    if bool((layer.weight_zero_point != 0).any()):
        return "weights with a nonzero zero point"
    return None


class FastLinear(nn.Module):
    """int8 GEMM of a frozen :class:`QuantLinear` (see the module docstring)."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        why = fast_reason(layer)
        if why is not None:
            raise ValueError(f"FastLinear needs an int8-able layer: {why}")
        aq = layer.input_quant
        self.spec = aq.spec
        self.dynamic = aq.spec.dynamic
        self.per_token = isinstance(aq.spec.granularity, PerToken)
        self.offset = 0 if aq.spec.signed else 128
        # (o - z) is 0 for every code when the grid is symmetric around o
        self.needs_shift = not (aq.spec.symmetric and aq.spec.symmetric_zero_point == self.offset)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        codes = layer.qweight.int_repr().to(torch.int8)                       # [out, in]
        self.register_buffer("weight_t", codes.t().contiguous())              # [in, out]
        self.register_buffer("weight_colsum", codes.sum(dim=1, dtype=torch.int32))
        self.register_buffer("weight_scale", layer.weight_scale.float().reshape(-1))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        if not self.dynamic:
            self.register_buffer("input_scale", aq.scale.float().reshape(()))
            self.register_buffer("input_zero_point", aq.zero_point.reshape(()).to(torch.int32))

    def _qparams(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.dynamic:
            return self.input_scale, self.input_zero_point
        if self.per_token:
            lo, hi = torch.aminmax(x2, dim=1)
        else:
            lo, hi = torch.aminmax(x2)
            lo, hi = lo.reshape(1), hi.reshape(1)
        s, z = range_to_qparams(lo, hi, self.spec)
        return s.unsqueeze(1), z.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        s, z = self._qparams(x2)
        q = torch.div(x2, s).round_().add_(z).clamp_(self.spec.qmin, self.spec.qmax)
        if self.offset:
            q.sub_(self.offset)
        acc = int_matmul(q.to(torch.int8), self.weight_t)                    # exact int32
        if self.needs_shift:
            acc = acc + (self.offset - z).to(torch.int32) * self.weight_colsum
        y = torch.mul(acc, s).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input={self.spec}"


class DequantizedLayer(nn.Module):
    """A frozen layer's float operation with its weight dequantized once (same outputs)."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        self.layer = copy.copy(layer)          # shares buffers; keeps input_quant and op()
        self.register_buffer("weight", layer.quantized_weight().detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer.input_quant is not None:
            x = layer.input_quant(x)
        return layer.op(x, self.weight, layer.bias)


def _has_ort() -> bool:
    """onnxruntime/onnxscript/onnx installed, and a torch whose exporter lowbit supports."""
    import importlib.util

    from torch.torch_version import TorchVersion

    return (TorchVersion(torch.__version__) >= (2, 7)
            and all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript", "onnx")))


def fast(q: nn.Module, *, backend: str = "auto", example_inputs=None, threads: int | None = None,
         int8_format: str | None = None) -> nn.Module:
    """A copy of the frozen quantized model ``q`` that runs fast on the CPU (see the module docstring).

    Args:
        backend: ``"ort"`` (ONNX Runtime on the exported graph; needs ``example_inputs``, one
            batch of inputs), ``"torch"`` (int8 GEMMs in place), or ``"auto"``: ``"ort"`` when
            ``example_inputs`` is given and onnxruntime/onnxscript are installed, else ``"torch"``.
        threads: ONNX Runtime threads (``"ort"``); torch uses ``torch.get_num_threads()``.
        int8_format: ``"ort"``: ``"u8s8"`` or ``"u8u8"`` to force ONNX Runtime's int8 GEMM format;
            default (``None``, or the ``LOWBIT_INT8_FORMAT`` environment variable): the fastest one
            that is exact on this CPU (:mod:`lowbit.integer.cpu`).

    The copy gives the frozen model's outputs up to float32 rounding and is in eval mode; ``q`` is
    untouched. ``model.lowbit_fast`` lists ``{"int8": [...], "float": {layer: why}}``.
    """
    frozen_quant_layers(q, "fast()")   # checks
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_format(int8_format)
    if backend == "auto":
        backend = "ort" if example_inputs is not None and _has_ort() else "torch"
    if backend == "ort":
        if example_inputs is None:
            raise ValueError("backend='ort' exports the model: pass example_inputs (one batch of model inputs)")
        from ..export import ort_module

        return ort_module(q, example_inputs, threads=threads, integer=True, int8_format=int8_format)
    model = copy.deepcopy(q).eval()
    report: dict = {"int8": [], "float": {}}
    for name, layer in quant_layers(model):
        why = fast_reason(layer)
        if why is None:
            set_module(model, name, FastLinear(layer))
            report["int8"].append(name)
        else:
            set_module(model, name, DequantizedLayer(layer))
            report["float"][name] = why
    model.lowbit_fast = report
    if report["float"]:
        log.info("lowbit.fast: %d layers run int8, %d float (dequantized once): %s", len(report["int8"]),
                 len(report["float"]), dict(list(report["float"].items())[:3]))
    return model
