"""The built-in demo and single-model quantization, as library calls (``lowbit demo`` and
``lowbit quantize`` only parse arguments into these).

- :func:`run_demo` (``lowbit demo``): a built-in model, a table of recipes, each with accuracy,
  KL to the float predictions, top-1 agreement and checkpoint size (:mod:`.table`).
- :func:`quantize_model` (``lowbit quantize``): one recipe, saved with ``lb.save`` (:mod:`.single`).
- Built-in models by name, one handler per kind: :data:`BUILTIN_MODELS`, :func:`register_builtin`
  (:mod:`.builtin`).
- Measurements: :func:`fidelity`, :func:`checkpoint_bytes`, :func:`float_checkpoint_bytes`
  (:mod:`.metrics`).
"""
from .builtin import BUILTIN_MODELS, BuiltinModel, builtin, classifier_metrics, register_builtin
from .metrics import Fidelity, checkpoint_bytes, fidelity, float_checkpoint_bytes, logits_of, torch_threads
from .single import (build_user_model, check_out_path, load_calibration_file, load_state_dict_file, load_test_file,
                     quantize_model, user_metrics)
from .table import DEFAULT_MODEL, DEMO_RECIPES, DemoResult, DemoRow, run_demo

__all__ = [
    "run_demo", "DemoResult", "DemoRow", "DEMO_RECIPES", "DEFAULT_MODEL",
    "quantize_model", "build_user_model", "load_state_dict_file", "load_calibration_file", "load_test_file",
    "user_metrics", "check_out_path",
    "BUILTIN_MODELS", "BuiltinModel", "builtin", "register_builtin", "classifier_metrics",
    "Fidelity", "fidelity", "checkpoint_bytes", "float_checkpoint_bytes", "logits_of", "torch_threads",
]
