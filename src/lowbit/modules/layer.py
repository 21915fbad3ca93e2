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


# range methods that mean the same on a weight as on an activation (no clipping of a weight's outliers)
_WEIGHT_SAFE = ("minmax", "maxabs", "mse", "hqq")


def weight_range_method(observer: str, weight_observer: str | None, observer_options: dict | None,
                        activations: QuantSpec | None) -> tuple[str, dict | None]:
    """``(method, options)`` of the weights' range, from ``lb.quantize``'s arguments.

    ``weight_observer`` wins (with no options). Weight-only (``activations=None``): ``observer`` and
    ``observer_options`` are the weights'. With activations they are the activations': the weights
    keep ``observer`` only if it is a range method that clips nothing on purpose (min/max, max-abs,
    MSE), without the options; a percentile/entropy/moving-average observer gives the weights min/max.
    """
    if weight_observer is not None:
        return weight_observer, None
    if activations is None:
        return observer, observer_options
    return (observer if observer in _WEIGHT_SAFE else "minmax"), None


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

    def gemm_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The vectors the GEMM weight multiplies, ``[groups, n, d]`` (GPTQ's Hessian, AWQ)."""
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
        with torch.inference_mode(False):   # codes stay ordinary tensors (loadable, movable) outside that mode
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
        wq = WeightQuantizer(weights, *weight_range_method(observer, weight_observer, observer_options, activations))
        aq = None if activations is None else ActQuantizer(activations, observer, observer_options)
        return wq, aq
