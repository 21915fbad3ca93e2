"""``QuantConv1d`` / ``QuantConv2d``: convolution of the quantized input with the quantized kernel.

The weight is quantized in its GEMM view ``[out, in/groups * k...]`` (see ``WeightQuantizer``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import QuantSpec
from .layer import QuantLayer

__all__ = ["QuantConv1d", "QuantConv2d"]


def _conv_patches(layer: "_QuantConvNd", x: torch.Tensor, nd: int) -> torch.Tensor:
    """im2col patches of ``x`` as ``[groups, n, in/groups * k...]`` in the GEMM weight's (channel, k...) order."""
    one_d = nd == 1
    if x.dim() == nd + 1:  # unbatched input
        x = x.unsqueeze(0)
    kernel, stride, dilation = (tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.dilation))
    padding = layer.padding
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0,) * nd
    elif padding == "valid":
        padding = (0,) * nd
    elif padding == "same":
        pads = []
        for k, dil in zip(reversed(kernel), reversed(dilation)):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        padding = (0,) * nd
    padding = tuple(padding)
    if one_d:
        x = x.unsqueeze(2)
        kernel, stride, dilation, padding = (1,) + kernel, (1,) + stride, (1,) + dilation, (0,) + padding
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C*k, L]
    g = layer.groups
    n, ck, length = cols.shape
    return cols.reshape(n, g, ck // g, length).permute(1, 0, 3, 2).reshape(g, n * length, ck // g)


def _conv_function(conv, stride, padding, dilation, groups, padding_mode, pads):
    """``f(x, w, b)``: ``conv`` (``F.conv1d``/``F.conv2d``) with the layer's geometry (padding modes too)."""
    def f(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if padding_mode != "zeros":
            return conv(F.pad(x, pads, mode=padding_mode), weight, bias, stride, 0, dilation, groups)
        return conv(x, weight, bias, stride, padding, dilation, groups)
    return f


class _QuantConvNd(QuantLayer):
    _conv = staticmethod(F.conv2d)
    _spatial = 2
    integer_kind = "conv"

    def __init__(self, module: nn.Module, weight_quant, input_quant) -> None:
        super().__init__(module.weight, module.bias, weight_quant, input_quant)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "groups", "padding_mode"):
            setattr(self, name, getattr(module, name))
        self._reversed_padding_repeated_twice = getattr(module, "_reversed_padding_repeated_twice", None)

    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return self._conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def float_op(cls, module: nn.Module):
        """The convolution of ``module`` (a float ``nn.Conv1d``/``Conv2d`` or this layer): weight ``[out, in/groups, k...]``."""
        return _conv_function(cls._conv, module.stride, module.padding, module.dilation, module.groups,
                              module.padding_mode, getattr(module, "_reversed_padding_repeated_twice", None))

    def gemm_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The vectors the GEMM weight ``[out, in/groups * k...]`` multiplies (im2col), ``[groups, n, d]``."""
        return _conv_patches(self, x, self._spatial)

    @classmethod
    def from_float(cls, module: nn.Module, weights: QuantSpec, activations: QuantSpec | None,
                   observer: str = "minmax", weight_observer: str | None = None,
                   observer_options: dict | None = None):
        """Wrap ``module``'s parameters (shared, not copied) in a quantized layer."""
        wq, aq = cls._quantizers(weights, activations, observer, weight_observer, observer_options)
        return cls(module, wq, aq)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}" + (", frozen" if self.frozen else ""))


class QuantConv1d(_QuantConvNd):
    """Quantized :class:`torch.nn.Conv1d`."""

    float_type = nn.Conv1d
    _conv = staticmethod(F.conv1d)
    _spatial = 1


class QuantConv2d(_QuantConvNd):
    """Quantized :class:`torch.nn.Conv2d`."""

    float_type = nn.Conv2d
    _conv = staticmethod(F.conv2d)
