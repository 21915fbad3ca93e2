"""``QuantConvTranspose1d`` / ``QuantConvTranspose2d``: transposed convolution of the quantized input
with the quantized kernel.

A transposed convolution (``nn.ConvTranspose*d``) stores its weight ``[in, out/groups, k...]``: its
output channels are axis 1. Output channel ``o = g * out/groups + j`` of group ``g`` reads the
``in/groups`` input channels of that group through ``W[g * in/groups + c, j, :]``, so the GEMM view
(one row per output channel, as every lowbit layer has) is::

    W_gemm[g * out/groups + j, c, k...] = W[g * in/groups + c, j, k...]     ([out, in/groups, k...])

The quantized layer holds ``W_gemm`` as its master weight (a copy, as for transformers' ``Conv1D``),
so ``PerChannel(0)`` is one scale per output channel and ``PerGroup`` groups run along
``(input channel, k...)``, as for a convolution; its forward turns the fake-quantized view back
into ``[in, out/groups, k...]`` for ``F.conv_transpose*d``.

The GEMM inputs (GPTQ's Hessian): a transposed convolution with stride ``s``, padding ``p``,
output padding ``op`` and dilation ``d`` equals a stride-1 convolution with the flipped kernel over
the input with ``s - 1`` zeros inserted between samples, padded by ``d (k - 1) - p`` on each side
(``+ op`` at the end); the im2col patches of that input, with their kernel positions flipped, are
the vectors each row of ``W_gemm`` multiplies (Dumoulin & Visin 2016, "A guide to convolution
arithmetic for deep learning", Sec. 4).

Export: ``DequantizeLinear -> ConvTranspose``; the initializer is the kernel ``[in, out, k...]``
(``axis=1``) for per-tensor scales and for per-channel scales without groups, else the GEMM view
followed by its reshape and transpose. Integer execution: the integer GEMM over the unfolded
codes (``integer_kind = "gemm"``, :class:`lowbit.integer.layer.IntegerGemm`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import PerChannel, PerTensor, QuantSpec
from .layer import QuantLayer

__all__ = ["QuantConvTranspose1d", "QuantConvTranspose2d"]


def _to_gemm(w: torch.Tensor, groups: int) -> torch.Tensor:
    """``[in, out/groups, k...]`` -> ``[out, in/groups, k...]``."""
    i, og, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
    return w.reshape(groups, i // groups, og, *k).transpose(1, 2).reshape(groups * og, i // groups, *k)


def _from_gemm(w: torch.Tensor, groups: int) -> torch.Tensor:
    """``[out, in/groups, k...]`` -> ``[in, out/groups, k...]`` (inverse of :func:`_to_gemm`)."""
    o, ig, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
    return w.reshape(groups, o // groups, ig, *k).transpose(1, 2).reshape(groups * ig, o // groups, *k)


def _function(conv_t, stride, padding, output_padding, groups, dilation):
    """``f(x, w_gemm, b)``: the transposed convolution with a GEMM-view weight."""
    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, output_padding=output_padding) -> torch.Tensor:
        return conv_t(x, _from_gemm(w, groups), b, stride, padding, output_padding, groups, dilation)
    return f


def _patches(x: torch.Tensor, nd: int, kernel: tuple, stride: tuple, padding: tuple, output_padding: tuple,
             dilation: tuple, groups: int) -> torch.Tensor:
    """im2col of the zero-inserted, padded input, kernel positions flipped: ``[groups, n * L, in/groups * k...]``
    in the GEMM view's ``(channel, k...)`` order. Only copies values (exact on integer codes held as floats)."""
    if x.dim() == nd + 1:
        x = x.unsqueeze(0)
    n, c, size = x.shape[0], x.shape[1], tuple(x.shape[2:])
    up = x.new_zeros((n, c) + tuple((length - 1) * s + 1 for length, s in zip(size, stride)))
    up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)] = x
    pads = []
    for i in reversed(range(nd)):
        lo = dilation[i] * (kernel[i] - 1) - padding[i]
        pads += [lo, lo + output_padding[i]]
    up = F.pad(up, pads)                                   # negative pads crop (padding beyond d (k - 1))
    k2, d2 = kernel, dilation
    if nd == 1:
        up, k2, d2 = up.unsqueeze(2), (1,) + kernel, (1,) + dilation
    cols = F.unfold(up, k2, dilation=d2)                   # [N, C*k, L]
    length = cols.shape[2]
    cols = cols.reshape(n, groups, c // groups, *kernel, length)
    cols = cols.flip(tuple(range(3, 3 + nd)))              # the equivalent convolution's kernel is flipped
    return cols.reshape(n, groups, -1, length).permute(1, 0, 3, 2).reshape(groups, n * length, -1)


class _QuantConvTransposeNd(QuantLayer):
    _conv_t = staticmethod(F.conv_transpose2d)
    _spatial = 2
    channel_dim = 1
    integer_kind = "gemm"     # lowbit.integer.IntegerGemm: the integer GEMM over gemm_unfold's rows

    def __init__(self, module: nn.Module, weight: nn.Parameter, weight_quant, input_quant) -> None:
        super().__init__(weight, module.bias, weight_quant, input_quant)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding",
                     "dilation", "groups", "padding_mode"):
            setattr(self, name, getattr(module, name))

    # -- the float layer -------------------------------------------------------------------------
    @classmethod
    def float_gemm_weight(cls, module: nn.Module) -> torch.Tensor:
        """``[out, in/groups, k...]`` (a view without groups, a copy with them)."""
        return _to_gemm(module.weight, module.groups)

    @classmethod
    def float_weight_from_gemm(cls, module: nn.Module, w: torch.Tensor) -> torch.Tensor:
        return _from_gemm(w, module.groups)

    @classmethod
    def float_op(cls, module: nn.Module):
        return _function(cls._conv_t, module.stride, module.padding, module.output_padding, module.groups,
                         module.dilation)

    @classmethod
    def from_float(cls, module: nn.Module, weights: QuantSpec, activations: QuantSpec | None,
                   observer: str = "minmax", weight_observer: str | None = None,
                   observer_options: dict | None = None):
        """A quantized layer holding ``module.weight`` in its GEMM view (a copy) and ``module.bias`` (shared)."""
        if module.padding_mode != "zeros":
            raise ValueError(f"{type(module).__name__} with padding_mode={module.padding_mode!r}: only 'zeros' "
                             "is defined for transposed convolutions")
        wq, aq = cls._quantizers(weights, activations, observer, weight_observer, observer_options)
        w = module.weight
        weight = nn.Parameter(_to_gemm(w.detach(), module.groups).contiguous(), requires_grad=w.requires_grad)
        return cls(module, weight, wq, aq)

    # -- the quantized layer ---------------------------------------------------------------------
    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return type(self).float_op(self)(x, weight, bias)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is None:
            return super().forward(x)
        # the output padding that reaches output_size, as torch's ConvTranspose computes it
        op = nn.ConvTranspose2d._output_padding(self, x, output_size, self.stride, self.padding, self.kernel_size,
                                                self._spatial, self.dilation)
        if self.input_quant is not None:
            x = self.input_quant(x)
        return type(self).float_op(self)(x, self.quantized_weight(), self.bias, output_padding=op)

    def gemm_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``[groups, n, in/groups * k...]``: the patches each row of the GEMM view multiplies (module docstring)."""
        return self.gemm_unfold()(x)

    def gemm_unfold(self):
        geometry = (self._spatial, tuple(self.kernel_size), tuple(self.stride), tuple(self.padding),
                    tuple(self.output_padding), tuple(self.dilation), self.groups)
        return lambda x: _patches(x, *geometry)

    def onnx_weight(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int):
        """The kernel ``[in, out, k...]`` (per tensor, or per output channel ``axis=1`` without groups), else
        the GEMM view followed by its reshape and transpose in the graph."""
        g = self.weight_quant.spec.granularity
        shape, groups = tuple(self._weight_shape), self.groups
        if isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis % 2 == 0 and groups == 1):
            return _from_gemm(codes.reshape(shape), groups), scale, zero_point, 1 if isinstance(g, PerChannel) else axis, None
        return codes, scale, zero_point, axis, lambda w: _from_gemm(w.reshape(shape), groups)

    def functional(self):
        """``f(x, w, b)`` with ``w`` the kernel ``[in, out/groups, k...]`` (what :meth:`onnx_weight` hands on)."""
        conv_t, stride, padding, output_padding = self._conv_t, self.stride, self.padding, self.output_padding
        groups, dilation = self.groups, self.dilation

        def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            return conv_t(x, w, b, stride, padding, output_padding, groups, dilation)
        return f

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}, groups={self.groups}"
                + (", frozen" if self.frozen else ""))


class QuantConvTranspose1d(_QuantConvTransposeNd):
    """Quantized :class:`torch.nn.ConvTranspose1d`."""

    float_type = nn.ConvTranspose1d
    _conv_t = staticmethod(F.conv_transpose1d)
    _spatial = 1


class QuantConvTranspose2d(_QuantConvTransposeNd):
    """Quantized :class:`torch.nn.ConvTranspose2d`."""

    float_type = nn.ConvTranspose2d
    _conv_t = staticmethod(F.conv_transpose2d)
