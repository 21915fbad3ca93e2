"""Integer execution of frozen quantized models (a reference path, exact integer arithmetic).

``lowbit.integer.to_integer(q)`` returns a copy of a frozen model whose quantized Linear/Conv1d/
Conv2d layers compute with integer codes, an exact int32 GEMM, int32 bias and fixed-point
requantization; see :mod:`lowbit.integer.layer` for the arithmetic and
:mod:`lowbit.integer.convert` for how layers are linked.

``lowbit.integer.fast(q)`` is the fast path (:mod:`lowbit.integer.fast`): int8 GEMMs on lowbit's
codes where the grids allow (or ONNX Runtime on the exported graph), the frozen model's outputs
to float32 rounding.

:mod:`lowbit.integer.cpu` knows which 8-bit integer formats this CPU multiplies exactly (ONNX
Runtime's U8S8 kernels saturate on x86 without VNNI) and picks the format of each layer.
"""
from . import cpu
from .convert import IntegerInfo, link_output_grids, to_integer
from .fast import BACKENDS, DequantizedLayer, FastLinear, fast, fast_reason
from .layer import IntegerConv, IntegerGemm, IntegerLayer, IntegerLinear, from_quant_layer, unsupported_reason

__all__ = ["to_integer", "IntegerInfo", "IntegerLayer", "IntegerLinear", "IntegerConv", "IntegerGemm", "from_quant_layer",
           "unsupported_reason", "link_output_grids", "fast", "FastLinear", "DequantizedLayer", "fast_reason", "BACKENDS", "cpu"]
