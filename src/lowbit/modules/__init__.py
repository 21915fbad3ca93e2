"""Quantized modules: layers that fake-quantize their weights and inputs, quantized embedding tables,
and the quantizers."""
from .conv import QuantConv1d, QuantConv2d
from .embedding import QuantEmbedding, check_embedding_spec
from .layer import QuantLayer
from .linear import QuantLinear
from .quantizer import OBSERVERS, ActQuantizer, Quantizer, WeightQuantizer, make_observer

# float module type -> quantized replacement (exact types: subclasses may change the forward)
QUANT_TYPES = {cls.float_type: cls for cls in (QuantLinear, QuantConv1d, QuantConv2d)}

__all__ = ["QuantLayer", "QuantEmbedding", "check_embedding_spec", "QuantLinear", "QuantConv1d", "QuantConv2d", "Quantizer", "WeightQuantizer",
           "ActQuantizer", "make_observer", "OBSERVERS", "QUANT_TYPES"]
