"""``QuantConv1D``: Hugging Face transformers' ``Conv1D`` (GPT-2, GPT, ...) quantized as the layer it is.

transformers' ``Conv1D(nf, nx)`` is a linear layer whose weight is stored transposed, ``[in, out]``::

    y = x @ W + b          (W: [nx, nf] = [in, out];  torch.addmm(b, x, W))

so ``y = F.linear(x, W^T, b)``. The quantized layer holds the GEMM view ``W^T`` (``[out, in]``) as
its master weight, so per-output-channel scales (``PerChannel(0)``) are per output feature and
``PerGroup`` groups run along the input features, exactly as for :class:`QuantLinear`; GPTQ, the
integer kernels, ONNX export and checkpoints treat it as a linear layer.

transformers is not imported: a module is a ``Conv1D`` when a class of that name from a
``transformers`` module is in its type's MRO (so this works for any transformers version, and
without transformers installed nothing matches).
"""
from __future__ import annotations

from torch import nn

from ..spec import QuantSpec
from .linear import QuantLinear

__all__ = ["QuantConv1D", "hf_conv1d_base"]


def hf_conv1d_base(module: nn.Module) -> type | None:
    """transformers' ``Conv1D`` class if ``module`` is one (or a subclass of it), else None."""
    for cls in type(module).__mro__:
        if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
            return cls
    return None


class QuantConv1D(QuantLinear):
    """Quantized transformers ``Conv1D``: ``y = input_quant(x) @ weight_quant(W^T)^T + b``.

    ``weight`` is ``[out, in]`` (the float layer's ``[in, out]`` transposed, a new parameter).
    """

    float_type = nn.Module   # the instance records the float class (transformers is optional)
    float_name = "transformers' Conv1D"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return hf_conv1d_base(module) is not None

    @classmethod
    def base_type(cls, module: nn.Module) -> type:
        return hf_conv1d_base(module)

    @classmethod
    def float_gemm_weight(cls, module: nn.Module):
        return module.weight.t()

    @classmethod
    def float_weight_from_gemm(cls, module: nn.Module, w):
        return w.t()

    @classmethod
    def from_float(cls, module: nn.Module, weights: QuantSpec, activations: QuantSpec | None,
                   observer: str = "minmax", weight_observer: str | None = None,
                   observer_options: dict | None = None) -> "QuantConv1D":
        """A quantized layer holding ``module.weight`` transposed (a copy) and ``module.bias`` (shared)."""
        wq, aq = cls._quantizers(weights, activations, observer, weight_observer, observer_options)
        w = module.weight
        weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
        layer = cls(w.shape[0], w.shape[1], weight, module.bias, wq, aq)
        layer.float_type = type(module)
        return layer
