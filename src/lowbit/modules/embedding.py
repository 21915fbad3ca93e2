"""``QuantEmbedding``: a weight-only quantized ``nn.Embedding`` (a lookup table of integer rows).

An embedding ``E[i]`` (row ``i`` of a ``[num_embeddings, dim]`` table) does no arithmetic with its
input, so only the table is quantized: ``E^ = (Q - z) * s`` on the grid of ``spec``, per row
(``PerChannel(0)``: one scale per token), per group of ``size`` consecutive entries of a row
(``PerGroup(size)``), or one for the table (``PerTensor()``). Until ``freeze`` the float table is
the master copy and is fake-quantized on each forward (so QAT works as for a linear layer);
``freeze()`` stores the codes (packed two per byte for 4 bits) with their scales and zero points as
buffers ``weight_codes``/``weight_scale``/``weight_zero_point``, like
:class:`~lowbit.modules.QuantLayer`, and a lookup then dequantizes only the rows it reads::

    y[..., :] = (Q[ids] - z[ids]) * s[ids]        (the same float32 arithmetic as dequantizing the table)

A large vocabulary is where most of a small transformer's parameters sit (MiniLM: 11.7M of 22.7M in
its word embeddings), so quantizing the table is what shrinks the whole model, not only its
linear layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import packing
from ..qtensor import QTensor
from ..spec import PerChannel, PerGroup, PerTensor, QuantSpec
from .quant_weight import QuantWeight
from .quantizer import WeightQuantizer

__all__ = ["QuantEmbedding", "check_embedding_spec"]


def check_embedding_spec(spec: QuantSpec, arg: str = "embeddings") -> None:
    """Raise unless ``spec`` is a static grid a lookup table can use (per tensor, row or row group)."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{arg} must be a lowbit.QuantSpec or None, got {type(spec).__name__}")
    g = spec.granularity
    ok = (isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis in (0, -2))
          or (isinstance(g, PerGroup) and g.axis in (1, -1)))
    if spec.dynamic or not ok:
        raise ValueError(f"{arg}: an embedding table needs a static grid per tensor, per row (PerChannel(0)) or per "
                         f"group of a row (PerGroup(size)), got {spec}")


class QuantEmbedding(QuantWeight):
    """Quantized :class:`torch.nn.Embedding` (see the module docstring).

    Attributes:
        weight_quant: the table's :class:`WeightQuantizer` (it sees the table as ``[rows, dim]``).
        frozen: whether the table is stored as integer codes.
    """

    float_type = nn.Embedding

    def __init__(self, weight: nn.Parameter, padding_idx: int | None, weight_quant: WeightQuantizer,
                 scale_grad_by_freq: bool = False, sparse: bool = False) -> None:
        super().__init__(weight, weight_quant)
        self.padding_idx = padding_idx
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse

    @classmethod
    def from_float(cls, module: nn.Embedding, spec: QuantSpec, observer: str = "minmax",
                   observer_options: dict | None = None) -> "QuantEmbedding":
        """Wrap ``module``'s table (shared, not copied). ``max_norm`` (which rewrites the table on
        lookup) is refused."""
        if module.max_norm is not None:
            raise ValueError("an nn.Embedding with max_norm renormalizes its table on every lookup; it cannot be "
                             "quantized (leave it float with exclude=)")
        check_embedding_spec(spec)
        wq = WeightQuantizer(spec, observer, observer_options)
        return cls(module.weight, module.padding_idx, wq, module.scale_grad_by_freq, module.sparse)

    @property
    def num_embeddings(self) -> int:
        return self._weight_shape[0]

    @property
    def embedding_dim(self) -> int:
        return self._weight_shape[1]

    # -- the table -----------------------------------------------------------------------------
    def _codes_shape(self) -> tuple[int, int]:
        return self._weight_shape

    def freeze(self) -> None:
        """Store the table as integer codes and drop the float master copy (idempotent)."""
        if not self.frozen:
            with torch.inference_mode(False):   # codes stay ordinary tensors outside that mode
                self.set_frozen_weight(self.qweight)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Dequantized rows ``ids`` (flat) of the frozen table, or None where rows are not byte-aligned."""
        spec = self.weight_quant.spec
        rows, dim = self._weight_shape
        codes = self.weight_codes
        packed = codes.dtype == torch.uint8 and spec.bits <= 4
        if packed:
            per_byte = 8 // packing.container_bits(spec.bits)
            if dim % per_byte:
                return None
            codes = codes.reshape(rows, dim // per_byte)
        picked = codes[ids]
        scale, zp = self.weight_scale, self.weight_zero_point
        if scale.dim():   # per row or per row group: the rows' own parameters
            scale, zp = scale[ids], zp[ids]
        q = QTensor(picked.reshape(-1) if packed else picked, scale, zp, spec, (ids.numel(), dim), packed)
        return q.dequantize().to(self._weight_dtype)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            flat = ids.reshape(-1)
            # checked eagerly (negative ids would index from the end); a compiled graph skips the host sync
            if not torch.compiler.is_compiling() and flat.numel() and (
                    int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
                raise IndexError(f"index out of range in QuantEmbedding: ids must lie in [0, {self.num_embeddings})")
            rows = self._rows(flat)
            if rows is not None:
                return rows.reshape(*ids.shape, self.embedding_dim)
        return F.embedding(ids, self.quantized_weight(), self.padding_idx, None, 2.0, self.scale_grad_by_freq,
                           self.sparse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}" + (
            f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "") + (
            ", frozen" if self.frozen else "")
