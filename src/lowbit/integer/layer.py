"""Integer Linear / Conv1d / Conv2d: int codes in, int32 accumulation, requantization out.

Built from a frozen :class:`lowbit.modules.QuantLayer`. With input codes ``q_x`` (the layer's
calibrated input grid ``(s_x, z_x)``, or a grid fitted to each tensor for dynamic activations) and
weight codes ``q_w`` (``(s_w, z_w)`` per tensor, per output channel or per group of inputs)::

    acc[m, o]  = sum_k (q_x[m, k] - z_x) * (q_w[o, k] - z_w[o])         exact integer GEMM
    bias_int   = round_half_even(b / (s_x * s_w))                        int32, as TFLite / gemmlowp
    y          = (acc + bias_int) * s_x * s_w                            float output, or
    q_out      = clamp(round((acc + bias_int) * M) + z_out, qmin, qmax)  M = s_x s_w / s_out (fixed point)

The GEMM runs on integer tensors (:func:`lowbit.ops.integer_math.int_matmul`): with 8-bit
activations and symmetric 8-bit-or-less weights both operands are int8 (``q_x - 128`` for unsigned
codes) and the zero point enters as a correction ``- z' * sum_k q_w[o, k]`` (Jacob et al. 2018,
eq. 7); otherwise the centered codes are multiplied in int32. Accumulation is int32 unless the
worst case ``K * max|a| * max|w|`` could overflow it, then int64.

Per-group weights have one ``s_w`` per block of ``size`` inputs, so each block has its own int32
accumulator and the blocks are combined in floating point:
``y = s_x * sum_g s_w[o, g] * acc_g[m, o] + b`` (the scheme of W4A8 group kernels).
Convolutions are computed as a GEMM over im2col patches of the integer codes; padding holds the
code of real zero (``z_x``). Any other layer type that lays its input out as GEMM rows
(``integer_kind = "gemm"``, :meth:`lowbit.modules.QuantLayer.gemm_unfold`, e.g. a transposed
convolution) runs as :class:`IntegerGemm`: the same GEMM over the rows its own unfolding gives.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..modules import QuantLayer
from ..ops.integer_math import int_matmul, quantize_multiplier, requantize
from ..spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

__all__ = ["IntegerLayer", "IntegerLinear", "IntegerConv", "IntegerGemm", "unsupported_reason", "from_quant_layer"]

_INT32 = (1 << 31) - 1


def unsupported_reason(layer: QuantLayer) -> str | None:
    """Why ``layer`` cannot run on the integer path (``None`` if it can)."""
    if layer.integer_kind not in _KINDS:
        return f"{type(layer).__name__}: {layer.integer_missing} (it runs float, on its dequantized weight)"
    if not layer.frozen:
        return "not frozen (call lb.freeze first)"
    aq = layer.input_quant
    if aq is None:
        return "weight-only quantization: its input is float"
    if not aq.enabled or not aq.calibrated:
        return "its input quantizer is disabled or uncalibrated"
    g = aq.spec.granularity
    if isinstance(g, PerToken):
        if layer.channel_dim != -1:
            return "per-token input scales mix inside a convolution"
    elif not isinstance(g, PerTensor):
        return f"input granularity {type(g).__name__} puts several scales into one accumulator"
    wg = layer.weight_quant.spec.granularity
    if isinstance(wg, PerChannel) and wg.axis not in (0, -2):
        return f"weights PerChannel(axis={wg.axis}) put several scales into one accumulator"
    if isinstance(wg, PerGroup) and wg.axis not in (1, -1):
        return f"weights PerGroup(axis={wg.axis}) put several scales into one accumulator"
    if aq.spec.bits > 16 or layer.weight_quant.spec.bits > 16:
        return "grids wider than 16 bits"
    return None


class IntegerLayer(nn.Module):
    """Base of the integer layers (see the module docstring).

    Attributes:
        output_grid: ``None`` (float output) or ``(spec, scale, zero_point)`` of the grid the
            output is requantized onto (the next layer's input grid); see :meth:`set_output_grid`.
        rounding: how requantization breaks ties, see :func:`lowbit.ops.integer_math.requantize`.
    """

    def __init__(self, layer: QuantLayer, rounding: str = "half_even") -> None:
        super().__init__()
        why = unsupported_reason(layer)
        if why is not None:
            raise ValueError(f"{type(layer).__name__} cannot run on integers: {why}")
        aq = layer.input_quant
        self.input_spec: QuantSpec = aq.spec.replace(rounding="nearest")
        self.register_buffer("input_scale", None if aq.spec.dynamic else aq.scale.detach().clone())
        self.register_buffer("input_zero_point", None if aq.spec.dynamic else aq.zero_point.detach().clone())
        qt = layer.qweight
        wspec = qt.spec
        codes = qt.int_repr().to(torch.int32)                          # [O, K] GEMM view
        out, k = codes.shape
        zw = ops.params.broadcast_param(qt.zero_point.to(torch.int32), codes.shape, wspec)
        centered = codes - zw
        self.group_size = wspec.granularity.size if isinstance(wspec.granularity, PerGroup) else None
        scale = qt.scale.detach().to(torch.float32)
        self.register_buffer("weight_scale", scale.reshape(out, -1) if self.group_size else scale.reshape(-1).expand(out).clone())
        fits8 = int(centered.min()) >= -128 and int(centered.max()) <= 127
        self.register_buffer("weight_int", centered.to(torch.int8 if fits8 else torch.int32))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.out_features, self.groups = out, getattr(layer, "groups", 1)
        self.rounding = rounding
        # int8 x int8 GEMM: activation codes shifted into int8, zero point applied as a correction
        self.offset = (0 if self.input_spec.signed else 128) if self.input_spec.bits <= 8 and fits8 else None
        terms = self.group_size or k
        max_a = 128 if self.offset is not None else self.input_spec.qmax - self.input_spec.qmin
        max_w = max(int(centered.abs().max()), 1)
        self.acc_dtype = torch.int32 if terms * max_a * max_w <= _INT32 else torch.int64
        self._blocks = self._weight_blocks()
        self.register_buffer("bias_int", None if self.dynamic else self._quantize_bias(self.input_scale))
        self.output_spec: QuantSpec | None = None
        for name in ("output_scale", "output_zero_point", "requant_mantissa", "requant_shift"):
            self.register_buffer(name, None)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._blocks = self._weight_blocks()     # derived from weight_int: follow it across devices
        return self

    @property
    def output_grid(self) -> tuple[QuantSpec, torch.Tensor, torch.Tensor] | None:
        if self.output_spec is None:
            return None
        return self.output_spec, self.output_scale, self.output_zero_point

    @property
    def dynamic(self) -> bool:
        return self.input_spec.dynamic

    # -- weights in GEMM blocks ------------------------------------------------------------------
    def _weight_blocks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per conv group: weights laid out for ``int_matmul`` and their column sums (for the correction)."""
        w = self.weight_int if self.offset is not None else self.weight_int.to(self.acc_dtype)
        og, kg = self.out_features // self.groups, w.shape[1]          # K of one conv group
        blocks = []
        for g in range(self.groups):
            wg = w[g * og:(g + 1) * og]
            if self.group_size:
                n = -(-kg // self.group_size)
                wg = F.pad(wg, (0, n * self.group_size - kg)).reshape(og, n, self.group_size)
                blocks.append((wg.permute(1, 2, 0).contiguous(), wg.to(torch.int64).sum(2).t()))   # [G, gs, Og], [G, Og]
            else:
                blocks.append((wg.t().contiguous(), wg.to(torch.int64).sum(1)))                    # [Kg, Og], [Og]
        return blocks

    def _quantize_bias(self, sx: torch.Tensor) -> torch.Tensor | None:
        if self.bias is None or self.group_size:
            return None
        b = self.bias.to(torch.float64) / (sx.to(torch.float64) * self.weight_scale.to(torch.float64))
        return torch.round(b).clamp(-_INT32 - 1, _INT32).to(torch.int64)

    def set_output_grid(self, spec: QuantSpec | None, scale: torch.Tensor | None = None,
                        zero_point: torch.Tensor | None = None) -> bool:
        """Requantize outputs onto ``(spec, scale, zero_point)`` (a static per-tensor grid), or ``None`` for float.

        Returns False (and keeps float outputs) where integer requantization does not apply:
        per-group weights, or a multiplier ``s_x s_w / s_out`` outside ``(0, 2^31)``.
        """
        self.output_spec = self.output_scale = self.output_zero_point = None
        self.requant_mantissa = self.requant_shift = None
        if spec is None:
            return True
        if spec.dynamic or not isinstance(spec.granularity, PerTensor) or scale is None or zero_point is None:
            raise ValueError("set_output_grid needs a static per-tensor spec with its scale and zero_point")
        if self.group_size:
            return False
        if not self.dynamic:
            try:
                self.requant_mantissa, self.requant_shift = quantize_multiplier(self._multiplier(self.input_scale, scale))
            except ValueError:
                return False
        self.output_spec = spec.replace(rounding="nearest")
        self.output_scale = scale.detach().clone().float().reshape(())
        self.output_zero_point = zero_point.detach().clone().to(torch.int32).reshape(())
        return True

    def _multiplier(self, sx: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
        return sx.to(torch.float64) * self.weight_scale.to(torch.float64) / s_out.to(torch.float64)

    # -- input ----------------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes, scale, zero_point)`` of ``x`` on the layer's input grid (fitted now if dynamic)."""
        if self.dynamic:
            scale, zp = ops.choose_qparams(x.detach(), self.input_spec, "minmax")
        else:
            scale, zp = self.input_scale, self.input_zero_point
        return ops.quantize(x.detach(), self.input_spec, scale, zp), scale, zp.to(torch.int32)

    def _operand(self, codes: torch.Tensor, zp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GEMM operand and the value that stands for real zero in it (the padding value)."""
        if self.offset is not None:
            return (codes.to(torch.int16) - self.offset).to(torch.int8), zp.to(torch.int64) - self.offset
        return codes.to(torch.int32) - zp.to(torch.int32), torch.zeros_like(zp, dtype=torch.int64)

    # -- the integer GEMM -----------------------------------------------------------------------
    def accumulate(self, cols: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Exact ``sum_k (a - zero)(w)`` for GEMM rows ``cols`` [M, K]: int64 [M, O] (or [G, M, O] per group)."""
        m = cols.shape[0]
        kg = cols.shape[1] // self.groups
        outs = []
        for g, (w, colsum) in enumerate(self._blocks):
            a = cols[:, g * kg:(g + 1) * kg]
            if self.group_size:
                n = w.shape[0]
                a = F.pad(a, (0, n * self.group_size - kg)).reshape(m, n, self.group_size).transpose(0, 1)
                colsum = colsum.unsqueeze(1)                              # [G, 1, Og]
            acc = int_matmul(a.contiguous(), w, self.acc_dtype).to(torch.int64)
            if self.offset is not None:                                   # sum_k (a - z') w = a.w - z' sum_k w
                acc = acc - (zero.reshape(-1, 1) if zero.dim() else zero) * colsum
            outs.append(acc)
        return torch.cat(outs, dim=-1)

    def output(self, acc: torch.Tensor, sx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """From accumulators to the layer output (float, or requantized onto ``output_grid``)."""
        sx = sx.reshape(-1, 1) if sx.dim() else sx                      # per-token: one scale per row
        if self.group_size:
            y = (acc.to(torch.float64) * self.weight_scale.t().unsqueeze(1).to(torch.float64)).sum(0)
            y = y * sx.to(torch.float64)
            if self.bias is not None:
                y = y + self.bias.to(torch.float64)
            return y.to(dtype)
        bias_int = self.bias_int if not self.dynamic else self._quantize_bias(sx)
        if bias_int is not None:
            acc = acc + bias_int
        if self.output_grid is not None and (acc.numel() == 0 or int(acc.abs().max()) <= _INT32):
            spec, s_out, z_out = self.output_grid
            if self.requant_mantissa is not None:
                mantissa, shift = self.requant_mantissa, self.requant_shift
            else:
                mantissa, shift = quantize_multiplier(self._multiplier(sx, s_out))
            q = requantize(acc, mantissa, shift, z_out, spec.qmin, spec.qmax, self.rounding)
            return ((q - z_out).to(torch.float32) * s_out).to(dtype)   # exactly the codes, on the next grid
        y = acc.to(torch.float64) * (sx.to(torch.float64) * self.weight_scale.to(torch.float64))
        if self.output_grid is not None:   # accumulator beyond int32: requantize in floating point
            spec, s_out, z_out = self.output_grid
            y = ops.dequantize(ops.quantize(y.to(torch.float32), spec, s_out, z_out), spec, s_out, z_out)
        return y.to(dtype)

    def forward_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The output codes on ``output_grid`` (int32), as the integer pipeline hands them on."""
        if self.output_grid is None:
            raise ValueError("this layer has no output grid; call set_output_grid(spec, scale, zero_point)")
        spec, s_out, z_out = self.output_grid
        return ops.quantize(self.forward(x).to(torch.float32), spec, s_out, z_out).to(torch.int32)

    def extra_repr(self) -> str:
        w = f"weights int{'8' if self.weight_int.dtype == torch.int8 else '32'} [{self.out_features}, {self.weight_int.shape[1]}]"
        grid = "float out" if self.output_grid is None else f"requantized to {self.output_grid[0]}"
        return f"input {self.input_spec}, {w}, acc {str(self.acc_dtype).removeprefix('torch.')}, {grid}"


class IntegerLinear(IntegerLayer):
    """Integer Linear (``integer_kind == "linear"``: :class:`lowbit.modules.QuantLinear`): ``x [..., K] -> y [..., O]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, sx, zp = self.quantize_input(x)
        lead = x.shape[:-1]
        a, zero = self._operand(codes.reshape(-1, x.shape[-1]), zp.reshape(-1, 1) if zp.dim() else zp)
        acc = self.accumulate(a, zero)
        return self.output(acc, sx.reshape(-1, 1) if sx.dim() else sx, x.dtype).reshape(*lead, self.out_features)


class IntegerConv(IntegerLayer):
    """Integer convolution (``integer_kind == "conv"``: :class:`lowbit.modules.QuantConv1d` / ``QuantConv2d``),
    a GEMM over im2col patches of codes."""

    def __init__(self, layer: QuantLayer, rounding: str = "half_even") -> None:
        super().__init__(layer, rounding)
        self.spatial = len(tuple(layer.kernel_size))
        self.kernel_size, self.stride, self.dilation = layer.kernel_size, layer.stride, layer.dilation
        self.padding_mode = layer.padding_mode
        pads = layer._reversed_padding_repeated_twice
        if pads is None:
            raise ValueError("this convolution has no explicit padding; rebuild it with torch.nn.Conv1d/Conv2d")
        self.pads = tuple(int(p) for p in pads)

    def _im2col(self, a: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        n, c = a.shape[:2]
        for i in range(self.spatial):
            eff = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            a = a.unfold(2 + i, eff, self.stride[i])
        a = a[(slice(None),) * (2 + self.spatial) + tuple(slice(None, None, d) for d in self.dilation)]
        out_sp = tuple(a.shape[2:2 + self.spatial])
        perm = [0, *range(2, 2 + self.spatial), 1, *range(2 + self.spatial, 2 + 2 * self.spatial)]
        return a.permute(perm).reshape(n * math.prod(out_sp), c * math.prod(self.kernel_size)), out_sp

    def _pad(self, a: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        if not any(self.pads):
            return a
        if self.padding_mode == "zeros":
            return F.pad(a, self.pads, value=int(zero))
        # reflect / replicate / circular copy codes: exact through float32 for codes below 2^24
        return F.pad(a.to(torch.float32), self.pads, mode=self.padding_mode).to(a.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == self.spatial + 1
        if unbatched:
            x = x.unsqueeze(0)
        codes, sx, zp = self.quantize_input(x)
        a, zero = self._operand(codes, zp)
        cols, out_sp = self._im2col(self._pad(a, zero))
        y = self.output(self.accumulate(cols, zero), sx, x.dtype)
        y = y.reshape(x.shape[0], *out_sp, self.out_features).movedim(-1, 1)
        return y.squeeze(0) if unbatched else y


class IntegerGemm(IntegerLayer):
    """Integer form of a layer with ``integer_kind == "gemm"``: its own unfolding of the input into GEMM
    rows (:meth:`lowbit.modules.QuantLayer.gemm_unfold`), applied to the codes, then the integer GEMM.

    The unfolding runs on ``a - z'`` (the operand minus the code of real zero) held as float32, which is
    exact for codes of up to 16 bits because it only copies values and pads with zeros; adding ``z'``
    back gives the operand's rows with padding at the code of real zero, as :class:`IntegerConv` pads.
    """

    def __init__(self, layer: QuantLayer, rounding: str = "half_even") -> None:
        super().__init__(layer, rounding)
        self.unfold = layer.gemm_unfold()
        self.float_op = type(layer).float_op(layer)         # for the output's shape only (run on "meta")
        self.weight_shape = tuple(layer._weight_shape)
        self.channel_dims = len(self.weight_shape)         # inputs [n, C, spatial...] have this many dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == self.channel_dims - 1
        if unbatched:
            x = x.unsqueeze(0)
        shape = self.float_op(torch.empty(x.shape, device="meta"), torch.empty(self.weight_shape, device="meta"),
                              None).shape
        codes, sx, zp = self.quantize_input(x)
        a, zero = self._operand(codes, zp)
        rows = self.unfold(a.to(torch.float32) - zero.to(torch.float32))       # [G, M, Kg], exact
        rows = (rows.permute(1, 0, 2).reshape(rows.shape[1], -1) + zero.to(torch.float32)).to(a.dtype)
        y = self.output(self.accumulate(rows, zero), sx, x.dtype)            # [M, O]
        y = y.reshape(shape[0], *shape[2:], self.out_features).movedim(-1, 1)
        return y.squeeze(0) if unbatched else y


def from_quant_layer(layer: QuantLayer, rounding: str = "half_even") -> IntegerLayer:
    """The integer counterpart of a frozen quantized layer, by its :attr:`~lowbit.modules.QuantLayer.integer_kind`
    (raises ``ValueError`` with the reason if none)."""
    kind = _KINDS.get(layer.integer_kind)
    if kind is None:
        raise TypeError(f"no integer counterpart for {type(layer).__name__}: {layer.integer_missing}")
    return kind(layer, rounding)


# QuantLayer.integer_kind -> the integer layer that runs it
_KINDS: dict[str | None, type[IntegerLayer]] = {"linear": IntegerLinear, "conv": IntegerConv, "gemm": IntegerGemm}
