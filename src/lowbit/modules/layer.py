"""``QuantLayer``: the part every quantized Linear/Conv shares.

A quantized layer keeps the float weight as the master copy and computes::

    y = op(input_quant(x), weight_quant(W), b)

with ``op`` the layer's float operation (``F.linear``, ``F.conv2d``, ...), so calibration, PTQ and
QAT all run the same module. ``freeze()`` replaces the float weight by its integer codes (a
:class:`lowbit.QTensor` kept as buffers ``weight_codes``/``weight_scale``/``weight_zero_point``, so
``.to()``, ``state_dict`` and checkpoints carry it); afterwards ``weight`` reads back the
dequantized weight and the forward uses it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..qtensor import QTensor
from ..spec import QuantSpec
from .quantizer import ActQuantizer, WeightQuantizer

__all__ = ["QuantLayer", "cached_dequantized_weight", "weight_dtype", "track_weight_dtype"]


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype the module's float weight had (and that ``.to(dtype)`` calls since changed)."""
    return module.__dict__.get("_weight_dtype", torch.float32)


def track_weight_dtype(module: nn.Module, fn) -> None:
    """Follow ``module._apply(fn)`` (``.to``, ``.half()``, ...) for :func:`weight_dtype`: a frozen layer
    holds no float weight whose dtype would record it (its codes are integers)."""
    module.__dict__["_weight_dtype"] = fn(torch.empty(0, dtype=weight_dtype(module))).dtype


def cached_dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``module.qweight.dequantize()`` in the float weight's shape, computed once per stored weight.

    For a frozen :class:`QuantLayer` or :class:`~lowbit.modules.QuantEmbedding`: the codes only
    change by loading or re-freezing, which the buffers' ``data_ptr``/``_version`` key detects.
    """
    key = tuple((t.data_ptr(), t._version) for t in (module.weight_codes, module.weight_scale, module.weight_zero_point))
    cached = module.__dict__.get("_dq_cache")
    if cached is None or cached[0] != key:
        cached = (key, module.qweight.dequantize().reshape(module._weight_shape).to(weight_dtype(module)))
        module.__dict__["_dq_cache"] = cached
    return cached[1]


class QuantLayer(nn.Module):
    """Base of :class:`QuantLinear`, :class:`QuantConv1d`, :class:`QuantConv2d`.

    Attributes:
        weight_quant: :class:`WeightQuantizer`.
        input_quant: :class:`ActQuantizer` or ``None`` (weight-only quantization).
        frozen: whether the weight is stored as integers.
    """

    float_type: type[nn.Module] = nn.Module

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, weight_quant: WeightQuantizer,
                 input_quant: ActQuantizer | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.frozen = False
        self._weight_shape = tuple(weight.shape)
        self._weight_dtype = weight.dtype

    def _apply(self, fn, recurse=True):
        track_weight_dtype(self, fn)
        return super()._apply(fn, recurse)

    # -- the float operation of the layer ------------------------------------------------------
    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    # -- weights -------------------------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward sees it: fake-quantized (or dequantized, once frozen)."""
        if self.frozen:
            return cached_dequantized_weight(self)
        return self.weight_quant(self.weight)

    @property
    def qweight(self) -> QTensor:
        """The integer weight (GEMM view ``[out, in*k]``) as a :class:`QTensor`."""
        if self.frozen:
            return QTensor(self.weight_codes, self.weight_scale, self.weight_zero_point,
                           self.weight_quant.spec, self._gemm_shape(), self.weight_codes.dtype == torch.uint8
                           and self.weight_quant.spec.bits <= 4)
        w = WeightQuantizer.gemm_view(self.weight.detach())
        scale, zero_point = self.weight_quant.qparams(self.weight)
        return QTensor.from_float(w, self.weight_quant.spec, scale, zero_point)

    def _gemm_shape(self) -> tuple[int, int]:
        out = self._weight_shape[0]
        return (out, int(torch.Size(self._weight_shape).numel() // out))

    def freeze(self) -> None:
        """Store the weight as integer codes and drop the float master copy (idempotent)."""
        if self.frozen:
            return
        aq = self.input_quant
        if aq is not None and aq.enabled and not aq.calibrated:
            raise ValueError("this layer's input quantizer is not calibrated; run `with lb.calibrate(model): ...` "
                             "on some batches before lb.freeze")
        self.set_frozen_weight(self.qweight)

    def set_frozen_weight(self, qweight: QTensor) -> None:
        """Hold ``qweight`` (GEMM view) as the layer's integer weight and drop the float master copy."""
        if tuple(qweight.shape) != self._gemm_shape():
            raise ValueError(f"qweight has shape {tuple(qweight.shape)}, this layer needs {self._gemm_shape()}")
        if "weight" in self._parameters:
            del self.weight
        self.register_buffer("weight_codes", qweight.data)
        self.register_buffer("weight_scale", qweight.scale)
        self.register_buffer("weight_zero_point", qweight.zero_point)
        self.weight_quant.scale = self.weight_quant.zero_point = None  # held once, as weight_scale
        self.frozen = True

    def __getattr__(self, name: str):
        if name == "weight" and self.__dict__.get("frozen", False):
            return self.quantized_weight()
        return super().__getattr__(name)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self.op(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, module: nn.Module, weights: QuantSpec, activations: QuantSpec | None,
                   observer: str = "minmax", weight_observer: str | None = None,
                   observer_options: dict | None = None) -> "QuantLayer":
        raise NotImplementedError

    @staticmethod
    def _quantizers(weights: QuantSpec, activations: QuantSpec | None, observer: str,
                    weight_observer: str | None, observer_options: dict | None):
        wq = WeightQuantizer(weights, weight_observer or observer, observer_options if weight_observer is None else None)
        aq = None if activations is None else ActQuantizer(activations, observer, observer_options)
        return wq, aq
