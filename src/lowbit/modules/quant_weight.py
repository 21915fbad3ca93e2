"""``QuantWeight``: a module whose weight is quantized: a float master copy until frozen, integer
codes after.

Until ``freeze()`` the float weight is a parameter and the forward sees ``weight_quant(W)``
(fake-quantized, so PTQ, calibration and QAT run the same module). ``freeze()`` replaces it by its
integer codes (a :class:`lowbit.QTensor` kept as buffers ``weight_codes``/``weight_scale``/
``weight_zero_point``, so ``.to()``, ``state_dict`` and checkpoints carry it); afterwards
``weight`` reads back the dequantized weight, in the dtype the float weight had (followed through
``.to(dtype)``). A frozen module holds its codes and scales and nothing that grows with the float
weight: the dequantized weight is rebuilt for each call that needs it and not kept (subclasses may
run an integer kernel instead, see :class:`~lowbit.modules.QuantLinear`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import packing
from ..qtensor import QTensor
from ..spec import PerChannel, PerGroup
from .quantizer import WeightQuantizer

__all__ = ["QuantWeight"]


class QuantWeight(nn.Module):
    """Base of :class:`~lowbit.modules.QuantLayer` and :class:`~lowbit.modules.QuantEmbedding`.

    Subclasses say which 2-D view the codes have (:meth:`_codes_shape`: the GEMM view of a
    convolution, the table itself for an embedding).

    Attributes:
        weight_quant: :class:`WeightQuantizer`.
        frozen: whether the weight is stored as integers.
    """

    def __init__(self, weight: nn.Parameter, weight_quant: WeightQuantizer) -> None:
        super().__init__()
        self.weight = weight
        self.weight_quant = weight_quant
        self.frozen = False
        self._weight_shape = tuple(weight.shape)
        self._weight_dtype = weight.dtype

    def _codes_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        # a frozen module holds no float weight whose dtype would follow .to(dtype) / .half()
        self._weight_dtype = fn(torch.empty(0, dtype=self._weight_dtype)).dtype
        self._release_runtime()
        out = super()._apply(fn, recurse)
        self._prepare_runtime()
        return out

    # -- run-time form of the frozen codes (subclasses with integer kernels override these) -------
    def _prepare_runtime(self) -> None:
        """Lay the frozen codes out for this module's kernel (called on freeze, load and ``.to()``)."""

    def _release_runtime(self) -> None:
        """Undo :meth:`_prepare_runtime`: ``weight_codes`` holds the stored (ONNX) layout again."""

    def _stored_codes(self) -> torch.Tensor:
        """The codes in their stored layout (what checkpoints and :attr:`qweight` carry)."""
        return self.weight_codes

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.frozen:
            destination[prefix + "weight_codes"] = self._stored_codes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._release_runtime()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._prepare_runtime()

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward sees it: fake-quantized (or dequantized, once frozen)."""
        if not self.frozen:
            return self.weight_quant(self.weight)
        # rebuilt per call and not kept: a frozen model is its codes (a cache would be a float copy)
        return self.qweight.dequantize().reshape(self._weight_shape).to(self._weight_dtype)

    def _weight_rows(self, start: int, stop: int) -> torch.Tensor | None:
        """Rows ``start:stop`` of the frozen weight's 2-D view, dequantized (float, the weight's
        dtype), without building the rest; None where the grid does not split by rows."""
        spec = self.weight_quant.spec
        g = spec.granularity
        n, k = self._codes_shape()
        codes = self._stored_codes()
        packed = codes.dtype == torch.uint8 and spec.bits <= 4
        if packed:
            per_byte = 8 // packing.container_bits(spec.bits)
            if k % per_byte:
                return None
            codes = codes.reshape(n, k // per_byte)[start:stop].reshape(-1)
        else:
            codes = codes[start:stop]
        scale, zp = self.weight_scale, self.weight_zero_point
        if scale.dim():
            if (isinstance(g, PerChannel) and g.axis % 2 != 0) or (isinstance(g, PerGroup) and g.axis % 2 != 1):
                return None
            scale, zp = scale[start:stop], zp[start:stop]
        q = QTensor(codes, scale, zp, spec, (stop - start, k), packed)
        return q.dequantize().to(self._weight_dtype)

    @property
    def qweight(self) -> QTensor:
        """The integer weight (in :meth:`_codes_shape`) as a :class:`QTensor`."""
        spec = self.weight_quant.spec
        if self.frozen:
            codes = self._stored_codes()
            return QTensor(codes, self.weight_scale, self.weight_zero_point, spec, self._codes_shape(),
                           codes.dtype == torch.uint8 and spec.bits <= 4)
        w = self.weight.detach().reshape(self._codes_shape())
        scale, zero_point = self.weight_quant.qparams(self.weight)
        return QTensor.from_float(w, spec, scale, zero_point)

    def set_frozen_weight(self, qweight: QTensor) -> None:
        """Hold ``qweight`` (in :meth:`_codes_shape`) as the integer weight and drop the float master copy."""
        if tuple(qweight.shape) != self._codes_shape():
            raise ValueError(f"qweight has shape {tuple(qweight.shape)}, this module needs {self._codes_shape()}")
        if "weight" in self._parameters:
            del self.weight
        self.register_buffer("weight_codes", qweight.data)
        self.register_buffer("weight_scale", qweight.scale)
        self.register_buffer("weight_zero_point", qweight.zero_point)
        self.weight_quant.scale = self.weight_quant.zero_point = None  # held once, as weight_scale
        self.frozen = True
        self._prepare_runtime()

    def __getattr__(self, name: str):
        if name == "weight" and self.__dict__.get("frozen", False):
            return self.quantized_weight()
        return super().__getattr__(name)
