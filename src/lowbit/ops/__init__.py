"""Pure tensor math of quantization (no modules, no state).

``quantize`` / ``dequantize`` / ``fake_quantize`` follow ONNX QuantizeLinear / DequantizeLinear;
``choose_qparams`` fits a grid to a tensor; ``quant_error`` splits the error into clipping and
rounding.
"""
from .error import QuantError, quant_error
from .fake import STE_MODES, fake_quantize
from .grid import dequantize, quantize, stochastic_round
from .params import from_rows, to_rows
from .qparams import RANGE_METHODS, choose_qparams, range_to_qparams
from . import ranges as _ranges  # noqa: F401  (registers percentile, mse, entropy, moving_average)
from . import hqq as _hqq  # noqa: F401  (registers hqq)
from .sweep import ClipSweep, clip_sweep

__all__ = [
    "quantize",
    "dequantize",
    "fake_quantize",
    "stochastic_round",
    "choose_qparams",
    "range_to_qparams",
    "quant_error",
    "QuantError",
    "clip_sweep",
    "ClipSweep",
    "to_rows",
    "from_rows",
    "RANGE_METHODS",
    "STE_MODES",
]
