"""lowbit: quantize PyTorch models onto small integer grids, understand the error, ship the result."""
from . import observers, ops
from .qtensor import QTensor
from .spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

__version__ = "0.1.0"

__all__ = ["ops", "observers", "QTensor", "QuantSpec", "PerTensor", "PerChannel", "PerGroup", "PerToken", "__version__"]
