"""``QuantLinear``: ``y = input_quant(x) @ weight_quant(W)^T + b``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import QuantSpec
from .layer import QuantLayer

__all__ = ["QuantLinear"]


class QuantLinear(QuantLayer):
    """Quantized :class:`torch.nn.Linear` (weights fake-quantized until ``freeze``)."""

    float_type = nn.Linear

    def __init__(self, in_features: int, out_features: int, weight, bias, weight_quant, input_quant) -> None:
        super().__init__(weight, bias, weight_quant, input_quant)
        self.in_features = in_features
        self.out_features = out_features

    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def gemm_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The vectors ``W`` multiplies: the rows of ``x`` as ``[1, n, in]``."""
        return x.reshape(1, -1, x.shape[-1])

    @classmethod
    def from_float(cls, module: nn.Linear, weights: QuantSpec, activations: QuantSpec | None,
                   observer: str = "minmax", weight_observer: str | None = None,
                   observer_options: dict | None = None) -> "QuantLinear":
        """Wrap ``module``'s parameters (shared, not copied) in a quantized layer."""
        wq, aq = cls._quantizers(weights, activations, observer, weight_observer, observer_options)
        return cls(module.in_features, module.out_features, module.weight, module.bias, wq, aq)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}" + (
            ", frozen" if self.frozen else "")
