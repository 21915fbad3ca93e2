"""Model transforms that make quantization work better (each optional and measured)."""
from .fold_bn import find_conv_bn_pairs, fold_batchnorm

__all__ = ["fold_batchnorm", "find_conv_bn_pairs"]
