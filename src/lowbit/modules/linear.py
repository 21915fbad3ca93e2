"""``QuantLinear``: ``y = input_quant(x) @ weight_quant(W)^T + b``.

Once frozen, a weight-only ``QuantLinear`` (no input quantizer) can run an integer kernel of
:mod:`lowbit.ops.weight_only` for inputs of at most :attr:`QuantLinear.kernel_max_rows` rows on
CPU (token-by-token decoding, where reading the weight is the whole cost). The kernels compute
with bfloat16 activations and float32 accumulation: with ``kernel="auto"`` (the default) a
float32 model decodes at integer speed and its small inputs are rounded to bfloat16 on the way
in (a bfloat16 model loses nothing); ``kernel="dequantize"`` never uses them (the exact
reference, bit-identical to the fake-quantized model, much slower at batch 1). Which kernel
applies:

* codes of up to 4 bits in groups of 32/64/128/256 inputs and ``out_features % 64 == 0``: the
  int4 kernel; ``weight_codes`` then holds the kernel's tiled layout of the same bytes (half a
  byte per weight, no second copy), turned back into the stored (ONNX) layout for checkpoints,
  ``qweight`` and ``.to(device)``;
* signed 8-bit codes per output channel (or per tensor): the int8 kernel, on the stored codes.

See :mod:`lowbit.ops.weight_only` for the error the bfloat16 activations add. Larger inputs, other
grids and the exact path rebuild the float weight for the call (not kept). Which kernel a layer
has is :attr:`QuantLinear.runtime`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import weight_only
from ..spec import PerChannel, PerGroup, PerTensor, QuantSpec
from .layer import QuantLayer

__all__ = ["QuantLinear", "KERNELS"]

KERNELS = ("auto", "dequantize")


class QuantLinear(QuantLayer):
    """Quantized :class:`torch.nn.Linear` (weights fake-quantized until ``freeze``).

    Attributes:
        kernel: ``"auto"`` (integer kernels for small inputs, the default) or ``"dequantize"``
            (always the exact path); set by ``lb.freeze``.
        runtime: what a frozen layer runs for small inputs: ``"int4"``, ``"int8"`` or ``"dequantize"``.
    """

    float_type = nn.Linear
    channel_dim = -1
    integer_kind = "linear"
    kernel_max_rows = 8    # decoding (and a few beams); more rows are compute-bound: dequantize + float GEMM
    dequantize_tile = 1 << 20   # frozen layers larger than this dequantize tile by tile (float elements)

    def __init__(self, in_features: int, out_features: int, weight, bias, weight_quant, input_quant) -> None:
        super().__init__(weight, bias, weight_quant, input_quant)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = "auto"
        self.runtime = "dequantize"

    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @classmethod
    def float_op(cls, module: nn.Module):
        return F.linear

    def onnx_weight(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int):
        """``W^T`` (``[in, out]``, the ``B`` of ``MatMul``: ONNX Runtime fuses ``DequantizeLinear(int4,
        axis=0, block_size) -> MatMul`` into ``MatMulNBits``); per-group parameters transposed too.
        The graph computes ``x @ W^T + b`` (:meth:`functional`)."""
        g = self.weight_quant.spec.granularity
        if isinstance(g, PerGroup):
            scale, zero_point = scale.t(), zero_point.t()
        return codes.t(), scale, zero_point, (axis if isinstance(g, PerTensor) else 1 - axis), None

    def functional(self):
        def matmul(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            y = torch.matmul(x, w_t)
            return y if b is None else y + b
        return matmul

    # -- integer kernels of the frozen layer ----------------------------------------------------
    def set_kernel(self, kernel: str) -> None:
        """Choose ``"auto"`` or ``"dequantize"`` (see the module docstring)."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self._release_runtime()
        self.kernel = kernel
        self._prepare_runtime()

    def _kernel_for(self) -> str:
        spec = self.weight_quant.spec
        aq = self.input_quant
        if not self.frozen or self.kernel == "dequantize" or (aq is not None and aq.enabled) \
                or not spec.number_format.integer_grid:   # FP8/NF4/MX codes: dequantize per call
            return "dequantize"
        device = self.weight_codes.device
        n, k = self._gemm_shape()
        g = spec.granularity
        packed = self.weight_codes.dtype == torch.uint8 and self.weight_codes.numel() * 2 == n * k
        if spec.bits in (3, 4) and packed:   # codes packed two per byte
            size = g.size if isinstance(g, PerGroup) and g.axis in (1, -1) else (
                k if isinstance(g, PerChannel) and g.axis == 0 else 0)
            if size and weight_only.int4_supported(n, k, size, device):
                return "int4"
        elif (spec.bits == 8 and spec.signed and self.weight_codes.dtype == torch.int8
              and (isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis == 0))
              and weight_only.int8_supported(k, device)):
            return "int8"
        return "dequantize"

    def _prepare_runtime(self) -> None:
        if self.__dict__.get("defer_runtime"):
            return   # lb.load lays the codes out after it has let go of the file's copy
        runtime = self._kernel_for() if "weight_codes" in self._buffers else "dequantize"
        if runtime == self.runtime:
            return
        self._release_runtime()
        n, k = self._gemm_shape()
        spec = self.weight_quant.spec
        if runtime == "int4":
            offset = 8 if spec.signed else 0
            self.weight_codes = weight_only.onnx_to_int4_tiles(self.weight_codes, n, k, spec.signed).reshape(-1)
            scale = self.weight_scale.reshape(n, -1)
            zp = self.weight_zero_point.reshape(n, -1)
            self.register_buffer("weight_pairs", weight_only.int4_pair_table(scale, zp, offset), persistent=False)
            self._int4 = (k // scale.shape[1], offset)
        elif runtime == "int8":
            scale = self.weight_scale.float().reshape(-1).expand(n)
            zp = self.qweight.zero_point.float().reshape(-1).expand(n)
            self.register_buffer("weight_kscale", scale.to(torch.bfloat16).contiguous(), persistent=False)
            self.register_buffer("weight_zterm", (scale.to(torch.bfloat16).float() * zp).contiguous()
                                 if bool((zp != 0).any()) else None, persistent=False)
        self.runtime = runtime

    def _release_runtime(self) -> None:
        if self.runtime == "int4":
            self.weight_codes = self._stored_codes()
            del self.weight_pairs
        elif self.runtime == "int8":
            del self.weight_kscale, self.weight_zterm
        self.runtime = "dequantize"

    def _stored_codes(self) -> torch.Tensor:
        if self.runtime != "int4":
            return self.weight_codes
        n, k = self._gemm_shape()
        return weight_only.int4_tiles_to_onnx(self.weight_codes, n, k, self.weight_quant.spec.signed)

    def quantized_weight(self) -> torch.Tensor:
        if self.runtime != "int4":
            return super().quantized_weight()
        return self._weight_rows(0, self.out_features)

    def _weight_rows(self, start: int, stop: int) -> torch.Tensor | None:
        """Rows ``start:stop`` of the weight; from the tiled codes (``(u - c - z) * s``) for int4."""
        if self.runtime != "int4":
            return super()._weight_rows(start, stop)
        n, k = self._gemm_shape()
        group, offset = self._int4
        tiles = self.weight_codes.reshape(n, k // 2)[start:stop]
        u = weight_only.int4_untile(tiles, k).reshape(stop - start, k // group, group)
        z = self.weight_zero_point.reshape(n, -1)[start:stop].float().unsqueeze(-1)
        w = (u.float() - (z + offset)) * self.weight_scale.reshape(n, -1)[start:stop].float().unsqueeze(-1)
        return w.reshape(stop - start, k).to(self._weight_dtype)

    def _linear_by_tiles(self, x: torch.Tensor) -> torch.Tensor | None:
        """``F.linear`` with the weight dequantized :attr:`dequantize_tile` elements at a time (the
        float weight never exists whole: a large layer costs a tile of float memory, not 4 bytes
        per weight); None where the grid does not split by rows."""
        rows = max(64, self.dequantize_tile // self.in_features // 64 * 64)
        # the output is allocated before the tiles' temporaries: results kept between them would
        # fragment the heap, and the allocator would keep ~the float weight's size resident
        y = None
        for r in range(0, self.out_features, rows):
            w = self._weight_rows(r, min(r + rows, self.out_features))
            if w is None:
                return None
            part = F.linear(x, w)
            if y is None:
                y = part.new_empty(*part.shape[:-1], self.out_features)
            y[..., r:r + part.shape[-1]] = part
            del w, part
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runtime = self.runtime
        if (runtime != "dequantize" and x.device.type == "cpu" and x.numel() <= self.kernel_max_rows * x.shape[-1]):
            if runtime == "int4":
                y = weight_only.int4_mm(x, self.weight_codes.reshape(self.out_features, -1), self.weight_pairs,
                                        self._int4[0])
            else:
                y = weight_only.int8_mm(x, self.weight_codes, self.weight_kscale, self.weight_zterm)
            return y if self.bias is None else y + self.bias
        if (self.frozen and self.out_features * self.in_features > self.dequantize_tile
                and not torch.is_grad_enabled()):
            if self.input_quant is not None:
                x = self.input_quant(x)
            y = self._linear_by_tiles(x)
            if y is not None:
                return y
            return self.op(x, self.quantized_weight(), self.bias)
        return super().forward(x)

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
            f", frozen, runtime={self.runtime}" if self.frozen else "")
