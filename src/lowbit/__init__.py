"""lowbit: quantize PyTorch models onto small integer grids, understand the error, ship the result."""
from . import analysis, export, integer, modules, observers, ops, qat, recipes, transforms
from .accounting import Coverage, coverage
from .analysis import analyze
from .checkpoint import load, save
from .export import export_compressed_tensors, export_gguf, export_onnx, load_compressed_tensors
from .gptq import GPTQReport, gptq
from .qtensor import QTensor
from .quantize import QuantInfo, calibrate, freeze, quant_layers, quantize
from .spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from .stream import quantize_checkpoint

__version__ = "0.1.0"

__all__ = [
    "ops", "observers", "modules", "transforms", "qat", "analysis", "analyze", "recipes",
    "QTensor", "QuantSpec", "PerTensor", "PerChannel", "PerGroup", "PerToken",
    "quantize", "calibrate", "freeze", "quant_layers", "QuantInfo", "coverage", "Coverage", "save", "load", "integer",
    "gptq", "GPTQReport", "export", "export_onnx", "export_gguf", "export_compressed_tensors",
    "load_compressed_tensors", "quantize_checkpoint",
    "__version__",
]
