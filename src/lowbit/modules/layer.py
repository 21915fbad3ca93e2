"""``QuantLayer``: the part every quantized Linear/Conv shares.

A quantized layer keeps the float weight as the master copy and computes::

    y = op(input_quant(x), weight_quant(W), b)

with ``op`` the layer's float operation (``F.linear``, ``F.conv2d``, ...), so calibration, PTQ and
QAT all run the same module. Freezing and the frozen weight: :class:`~lowbit.modules.quant_weight.QuantWeight`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..spec import QuantSpec
from .quant_weight import QuantWeight
from .quantizer import ActQuantizer, WeightQuantizer

__all__ = ["QuantLayer"]


class QuantLayer(QuantWeight):
    """Base of :class:`QuantLinear`, :class:`QuantConv1d`, :class:`QuantConv2d`.

    Attributes:
        weight_quant: :class:`WeightQuantizer`.
        input_quant: :class:`ActQuantizer` or ``None`` (weight-only quantization).
        frozen: whether the weight is stored as integers.
    """

    float_type: type[nn.Module] = nn.Module   # the float layer it replaces (per instance: a subclass of it)

    # -- what the float layer is (see lowbit.modules.layer_types) --------------------------------
    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """True if ``module`` is this layer type's float layer (or a subclass of it)."""
        return isinstance(module, cls.float_type)

    @classmethod
    def base_type(cls, module: nn.Module) -> type:
        """The library class ``module`` derives from (its forward is the reference)."""
        return cls.float_type

    @classmethod
    def float_gemm_weight(cls, module: nn.Module) -> torch.Tensor:
        """A view ``[out, in...]`` of the float layer's weight (in-place edits reach the layer)."""
        return module.weight

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, weight_quant: WeightQuantizer,
                 input_quant: ActQuantizer | None) -> None:
        super().__init__(weight, weight_quant)
        self.bias = bias
        self.input_quant = input_quant

    # -- the float operation of the layer ------------------------------------------------------
    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    # -- weights -------------------------------------------------------------------------------
    def _gemm_shape(self) -> tuple[int, int]:
        out = self._weight_shape[0]
        return (out, int(torch.Size(self._weight_shape).numel() // out))

    _codes_shape = _gemm_shape

    def freeze(self) -> None:
        """Store the weight as integer codes and drop the float master copy (idempotent)."""
        if self.frozen:
            return
        aq = self.input_quant
        if aq is not None and aq.enabled and not aq.calibrated:
            raise ValueError("this layer's input quantizer is not calibrated; run `with lb.calibrate(model): ...` "
                             "on some batches before lb.freeze")
        self.set_frozen_weight(self.qweight)

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
