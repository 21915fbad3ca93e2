"""``QuantLayer``: the part every quantized Linear/Conv shares.

A quantized layer keeps the float weight as the master copy and computes::

    y = op(input_quant(x), weight_quant(W), b)

with ``op`` the layer's float operation (``F.linear``, ``F.conv2d``, ...), so calibration, PTQ and
QAT all run the same module. Freezing and the frozen weight: :class:`~lowbit.modules.quant_weight.QuantWeight`.

**The layer protocol.** Everything the rest of lowbit needs to know about a layer type lives on its
class, so a new layer type is one module (see ``docs/layers.md``):

* which float layers it replaces: :meth:`QuantLayer.accepts`, :meth:`QuantLayer.base_type`;
  every concrete subclass registers itself on definition (:data:`LAYER_REGISTRY`);
* its GEMM view: the weight as ``[out, in...]`` (:meth:`QuantLayer.float_gemm_weight` and its
  inverse :meth:`QuantLayer.float_weight_from_gemm`; the master weight of the quantized layer is
  held in this view) and the vectors that view multiplies (:meth:`QuantLayer.gemm_inputs`: GPTQ's
  Hessian, AWQ's statistics);
* where its channels are in activations (:attr:`QuantLayer.channel_dim`: ``-1`` for a layer on
  the last dimension, ``1`` for a convolution): bias correction, BN folding, equalization, PerToken;
* its float function with a GEMM-view weight (:meth:`QuantLayer.float_op`, :meth:`QuantLayer.op`,
  :meth:`QuantLayer.functional`): bound analysis, export, the dequantized fast path;
* a probe input (:meth:`QuantLayer.probe_input`): the checks of BN folding and of subclasses;
* its ONNX initializer layout (:meth:`QuantLayer.onnx_weight`);
* its integer form (:attr:`QuantLayer.integer_kind`: ``"linear"``, ``"conv"``, ``"gemm"`` (any layer
  that can unfold its input into GEMM rows, :meth:`QuantLayer.gemm_unfold`) or ``None`` with
  :attr:`QuantLayer.integer_missing` saying why it runs float).
"""
from __future__ import annotations

import torch
from torch import nn

from ..spec import PerChannel, PerTensor, QuantSpec
from .quant_weight import QuantWeight
from .quantizer import ActQuantizer, WeightQuantizer

__all__ = ["QuantLayer", "LAYER_REGISTRY"]

# every concrete QuantLayer subclass, in definition order (filled by QuantLayer.__init_subclass__)
LAYER_REGISTRY: list[type["QuantLayer"]] = []


# range methods that mean the same on a weight as on an activation (no clipping of a weight's outliers)
_WEIGHT_SAFE = ("minmax", "maxabs", "mse", "hqq")


def weight_range_method(observer: str, weight_observer: str | None, observer_options: dict | None,
                        activations: QuantSpec | None) -> tuple[str, dict | None]:
    """``(method, options)`` of the weights' range, from ``lb.quantize``'s arguments.

    ``weight_observer`` wins (with no options). Weight-only (``activations=None``): ``observer`` and
    ``observer_options`` are the weights'. With activations they are the activations': the weights
    keep ``observer`` only if it is a range method that clips nothing on purpose (min/max, max-abs,
    MSE), without the options; a percentile/entropy/moving-average observer gives the weights min/max.
    """
    if weight_observer is not None:
        return weight_observer, None
    if activations is None:
        return observer, observer_options
    return (observer if observer in _WEIGHT_SAFE else "minmax"), None


class QuantLayer(QuantWeight):
    """Base of :class:`QuantLinear`, :class:`QuantConv1d`, :class:`QuantConv2d`.

    Attributes:
        weight_quant: :class:`WeightQuantizer`.
        input_quant: :class:`ActQuantizer` or ``None`` (weight-only quantization).
        frozen: whether the weight is stored as integers.
    """

    float_type: type[nn.Module] = nn.Module   # the float layer it replaces (per instance: a subclass of it)
    float_name: str = ""          # how messages name that float layer (default: float_type's name)
    channel_dim: int = 1          # axis of the channels in the layer's inputs and outputs (-1: last, Linear-like)
    folds_bn: bool = True         # a BatchNorm on its output folds into its GEMM rows (lowbit.transforms.fold_bn)
    integer_kind: str | None = None   # "linear" / "conv" / "gemm": the lowbit.integer layer that runs it; None: float
    integer_missing: str = "no integer kernel for this layer type"   # why, when integer_kind is None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "float_type" in cls.__dict__ or "accepts" in cls.__dict__:   # a concrete layer type: register it
            cls.float_name = cls.__dict__.get("float_name") or cls.float_type.__name__
            LAYER_REGISTRY.append(cls)

    # -- what the float layer is (see lowbit.modules.layer_types) --------------------------------
    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """True if ``module`` is this layer type's float layer (or a subclass of it)."""
        return isinstance(module, cls.float_type)

    @classmethod
    def base_type(cls, module: nn.Module) -> type:
        """The library class ``module`` derives from (its forward is the reference)."""
        return cls.float_type

    @classmethod
    def float_gemm_weight(cls, module: nn.Module) -> torch.Tensor:
        """The float layer's weight as ``[out, in...]`` (its GEMM rows first). A view where the layout
        allows it (Linear, Conv: the weight itself); write changes back with :meth:`float_weight_from_gemm`."""
        return module.weight

    @classmethod
    def float_weight_from_gemm(cls, module: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`float_gemm_weight`: ``w`` (``[out, in...]``) in ``module.weight``'s layout."""
        return w

    @classmethod
    def float_op(cls, module: nn.Module):
        """``f(x, w, b)``: the float layer's function with its weight given in the GEMM view."""
        raise NotImplementedError(f"{cls.__name__} does not say what its float layer computes")

    @classmethod
    def float_in_channels(cls, module: nn.Module) -> int:
        """How many input channels (features) the float layer reads."""
        return int(cls.float_gemm_weight(module).shape[1]) * int(getattr(module, "groups", 1))

    @classmethod
    def probe_input(cls, module: nn.Module, n: int = 2) -> torch.Tensor:
        """A random input (seed 0) of ``n`` samples for checks: ``[n, in]``, or ``[n, C, k*d + 3, ...]``."""
        w = cls.float_gemm_weight(module)
        gen = torch.Generator().manual_seed(0)
        if cls.channel_dim == -1:
            shape = (n, w.shape[1])
        else:
            shape = (n, cls.float_in_channels(module)) + tuple(
                k * d + 3 for k, d in zip(tuple(module.kernel_size), tuple(module.dilation)))
        return torch.randn(shape, generator=gen).to(device=w.device, dtype=w.dtype)

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, weight_quant: WeightQuantizer,
                 input_quant: ActQuantizer | None) -> None:
        super().__init__(weight, weight_quant)
        self.bias = bias
        self.input_quant = input_quant

    # -- the float operation of the layer ------------------------------------------------------
    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def functional(self):
        """``f(x, w, b)``, the layer's operation holding no reference to the layer (for traced stand-ins:
        :mod:`lowbit.export.layers`), with ``w`` laid out as :meth:`onnx_weight` hands it on (default:
        the GEMM view ``[out, in/groups, k...]``, the kernel of a convolution)."""
        return type(self).float_op(self)

    def gemm_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The vectors the GEMM weight multiplies, ``[groups, n, d]`` (GPTQ's Hessian, AWQ)."""
        raise NotImplementedError

    def gemm_unfold(self):
        """``f(x) -> [groups, n, d]``: :meth:`gemm_inputs` as a function holding no reference to the layer,
        padding with zeros and only copying values (so it is exact on integer codes held as float32).
        Needed by ``integer_kind = "gemm"`` (:class:`lowbit.integer.layer.IntegerGemm`)."""
        raise NotImplementedError

    def onnx_weight(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int):
        """The weight initializer of the ONNX graph, from the GEMM-view codes ``[out, K]`` (and their
        parameters, ``axis`` the QuantizeLinear axis on that view): ``(codes, scale, zero_point, axis,
        to_native)``, ``to_native`` None or a function of the dequantized initializer giving the
        weight :meth:`functional` takes. Default: the kernel ``[out, in/groups, k...]`` where the
        scales allow it (per tensor / per output channel), else the GEMM view and a reshape."""
        g = self.weight_quant.spec.granularity
        shape = tuple(self._weight_shape)
        if isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis % 2 == 0):
            return codes.reshape(shape), scale, zero_point, axis, None
        return codes, scale, zero_point, axis, lambda w: w.reshape(shape)

    # -- weights -------------------------------------------------------------------------------
    def _gemm_shape(self) -> tuple[int, int]:
        out = self._weight_shape[0]
        return (out, int(torch.Size(self._weight_shape).numel() // out))

    _codes_shape = _gemm_shape

    def freeze(self) -> None:
        """Store the weight as integer codes and drop the float master copy (idempotent)."""
        if self.frozen:
            return
        aq = self.input_quant
        if aq is not None and aq.enabled and not aq.calibrated:
            raise ValueError("this layer's input quantizer is not calibrated; run `with lb.calibrate(model): ...` "
                             "on some batches before lb.freeze")
        with torch.inference_mode(False):   # codes stay ordinary tensors (loadable, movable) outside that mode
            self.set_frozen_weight(self.qweight)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self.op(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, module: nn.Module, weights: QuantSpec, activations: QuantSpec | None,
                   observer: str = "minmax", weight_observer: str | None = None,
                   observer_options: dict | None = None) -> "QuantLayer":
        raise NotImplementedError

    @staticmethod
    def _quantizers(weights: QuantSpec, activations: QuantSpec | None, observer: str,
                    weight_observer: str | None, observer_options: dict | None):
        wq = WeightQuantizer(weights, *weight_range_method(observer, weight_observer, observer_options, activations))
        aq = None if activations is None else ActQuantizer(activations, observer, observer_options)
        return wq, aq
