"""Export of quantized models (``lb.export_onnx``): a QDQ ONNX graph that ONNX Runtime runs.

See :mod:`lowbit.export.onnx_export` for how the graph is built and :mod:`lowbit.export.layers`
for what each quantized layer becomes. Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime).
"""
from .onnx_export import DEFAULT_OPSET, ExportInfo, export_onnx
from .runtime import OrtModule, compare_with_onnx, ort_module, session_options

__all__ = ["export_onnx", "ExportInfo", "DEFAULT_OPSET", "OrtModule", "ort_module", "session_options", "compare_with_onnx"]
