"""Export of quantized models: a QDQ ONNX graph that ONNX Runtime runs (``lb.export_onnx``), a GGUF
file for llama.cpp (``lb.export_gguf``) and a compressed-tensors checkpoint for transformers/vLLM
(``lb.export_compressed_tensors`` / ``lb.load_compressed_tensors``).

See :mod:`lowbit.export.onnx_export` for how the graph is built and :mod:`lowbit.export.layers`
for what each quantized layer becomes. Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime);
GGUF needs the ``gguf`` extra, compressed-tensors loading by transformers the ``compressed-tensors`` one.
"""
from .compressed_tensors import CTExportInfo, export_compressed_tensors, load_compressed_tensors
from .gguf import GGUFExportInfo, export_gguf
from .onnx_export import DEFAULT_OPSET, ExportInfo, export_onnx
from .runtime import OrtModule, compare_with_onnx, ort_module, session_options

__all__ = ["export_gguf", "GGUFExportInfo", "export_compressed_tensors", "load_compressed_tensors", "CTExportInfo",
           "export_onnx", "ExportInfo", "DEFAULT_OPSET", "OrtModule", "ort_module", "session_options", "compare_with_onnx"]
