"""Model transforms that make quantization work better (each optional and measured).

* :func:`fold_batchnorm`: BatchNorm into the layer before it (``lb.quantize`` does it).
* :func:`bound_activations`: ReLU -> ``clip(x, 0, limit)`` (:class:`BoundedReLU`); measure what a
  bound clips with :func:`activation_clipping`.
* :func:`equalize`: cross-layer equalization of ReLU networks (Nagel et al. 2019).
* :func:`smooth_quant`: SmoothQuant, activation outliers moved into the weights (Xiao et al. 2023).
* :func:`awq`: activation-aware scaling of weight columns before weight-only quantization (Lin et al. 2024).
* :func:`bias_correction`: remove the mean output shift of quantized layers (Nagel et al. 2019).
* :func:`quantize_with`: float transforms -> quantize -> calibrate -> bias correction -> freeze, by name.

Every transform returns a new model; its input is not modified (``fold_batchnorm`` excepted: it
works in place, for ``lb.quantize``'s own copy).
"""
from .bias import bias_correction, output_bias
from .bound import BoundedReLU, ClipStats, activation_clipping, bound_activations
from .equalization import EqualizationPair, equalize, find_equalization_pairs
from .fold_bn import find_conv_bn_pairs, fold_batchnorm
from .smooth_quant import ChannelScale, SmoothedLinear, SmoothInfo, outlier_ratio, smooth_quant
from .awq import AWQInfo, AWQLayer, awq
from .gguf_grid import gguf_grid
from .pipeline import TRANSFORMS, apply_transforms, quantize_with, register_transform

__all__ = [
    "fold_batchnorm", "find_conv_bn_pairs",
    "bound_activations", "BoundedReLU", "activation_clipping", "ClipStats",
    "equalize", "find_equalization_pairs", "EqualizationPair",
    "bias_correction", "output_bias",
    "smooth_quant", "SmoothedLinear", "ChannelScale", "SmoothInfo", "outlier_ratio",
    "awq", "AWQInfo", "AWQLayer", "gguf_grid",
    "quantize_with", "apply_transforms", "register_transform", "TRANSFORMS",
]
