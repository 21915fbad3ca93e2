"""Quantized modules: layers that fake-quantize their weights and inputs, quantized embedding tables,
and the quantizers.

Every module of this package is imported here, so that each layer type it defines registers itself
(:data:`lowbit.modules.layer.LAYER_REGISTRY`): a new layer type is one new file (``docs/layers.md``).
"""
import importlib as _importlib
import pkgutil as _pkgutil

from torch import nn

from .conv import QuantConv1d, QuantConv2d
from .embedding import QuantEmbedding, check_embedding_spec
from .layer import QuantLayer
from .hf_conv1d import QuantConv1D
from .linear import QuantLinear
from .quantizer import OBSERVERS, ActQuantizer, Quantizer, WeightQuantizer, make_observer

from .layer_types import (LAYER_CLASSES, float_gemm_weight, is_linear_like, layer_class, linear_features, make_quant_layer,
                          quant_class_for)

for _info in _pkgutil.iter_modules(__path__):   # layer types defined in their own module register on import
    _importlib.import_module(f"{__name__}.{_info.name}")
_registered = [cls.__name__ for cls in LAYER_CLASSES if cls.__name__ not in globals()]
globals().update({cls.__name__: cls for cls in LAYER_CLASSES})   # lowbit.modules.QuantConvTranspose2d, ...

# float module type -> quantized replacement (the torch layers; see layer_types.quant_class_for for
# subclasses and transformers' Conv1D)
QUANT_TYPES = {cls.float_type: cls for cls in LAYER_CLASSES if cls.float_type is not nn.Module}

__all__ = ["QuantLayer", "QuantEmbedding", "check_embedding_spec", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantConv1D",
           "LAYER_CLASSES", "layer_class", "quant_class_for", "make_quant_layer", "is_linear_like", "float_gemm_weight", "linear_features", "Quantizer", "WeightQuantizer",
           "ActQuantizer", "make_observer", "OBSERVERS", "QUANT_TYPES"] + _registered
