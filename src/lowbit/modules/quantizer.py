"""Quantizers: the small modules that fake-quantize one tensor inside a model.

``WeightQuantizer`` fits its grid to the weight it is given (one shot, with a range method of
:func:`lowbit.ops.choose_qparams`) and refits only when the weight changes; ``ActQuantizer``
collects activation statistics with a streaming observer during calibration, then fake-quantizes
with the fixed ``(scale, zero_point)`` (or, for ``spec.dynamic``, fits every tensor it sees).

Both apply ``ops.fake_quantize``: forward ``dequantize(quantize(x))``, backward straight-through,
so post-training quantization, calibration and quantization-aware training share one module.
In training mode a ``rounding="stochastic"`` spec rounds stochastically (with the quantizer's
seeded generator); in eval mode it rounds to nearest.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import observers as _observers
from .. import ops
from ..spec import PerChannel, PerGroup, PerToken, QuantSpec

__all__ = ["Quantizer", "WeightQuantizer", "ActQuantizer", "make_observer", "OBSERVERS"]

OBSERVERS = _observers.OBSERVERS  # name (as lb.quantize and the CLI take it) -> observer class


def make_observer(name: str, spec: QuantSpec, **options):
    """Build the streaming observer called ``name`` for ``spec``."""
    if name not in OBSERVERS:
        raise ValueError(f"observer must be one of {sorted(OBSERVERS)}, got {name!r}")
    return OBSERVERS[name](spec, **options)


class Quantizer(nn.Module):
    """Common part: a spec, a straight-through estimator mode, and the fake-quantize call.

    Attributes:
        spec: the grid.
        ste: ``"identity"`` or ``"clipped"``.
        enabled: when False the quantizer is the identity (float pass-through).
        generator: ``torch.Generator`` for stochastic rounding in training (seeded by the caller).
    """

    def __init__(self, spec: QuantSpec, ste: str = "identity") -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a lowbit.QuantSpec, got {type(spec).__name__}")
        if ste not in ops.STE_MODES:
            raise ValueError(f"ste must be one of {ops.STE_MODES}, got {ste!r}")
        self.spec = spec
        self.ste = ste
        self.enabled = True
        self.generator: torch.Generator | None = None
        self._eval_spec = spec.replace(rounding="nearest")

    def active_spec(self) -> QuantSpec:
        """Stochastic rounding only while training; nearest at evaluation."""
        return self.spec if self.training else self._eval_spec

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        # qparams were checked when they were set (or come from choose_qparams): no host sync per call
        return ops.fake_quantize(x, self.active_spec(), scale, zero_point, ste=self.ste, generator=self.generator,
                                 validate=False)

    def extra_repr(self) -> str:
        return f"{self.spec}, ste={self.ste}" + ("" if self.enabled else ", disabled")


class WeightQuantizer(Quantizer):
    """Fake-quantizes a weight with a grid fitted to it by ``ops.choose_qparams(w, spec, observer)``.

    The weight is seen in its GEMM view ``[out_features, everything else]`` (a conv weight
    ``[out, in, k...]`` becomes ``[out, in*k...]``), so ``PerChannel(0)`` is per output channel and
    ``PerGroup(size)`` groups consecutive input weights of one output.

    The fitted ``(scale, zero_point)`` are cached and refitted only when the weight changes (a new
    tensor or an in-place update such as an optimizer step). ``fix_qparams`` pins them (algorithms
    such as GPTQ choose the grid themselves).
    """

    def __init__(self, spec: QuantSpec, observer: str = "minmax", observer_options: dict | None = None,
                 ste: str = "identity") -> None:
        super().__init__(spec, ste)
        if spec.dynamic:
            raise ValueError("weights: spec.dynamic is for activations; use a static weight spec")
        if isinstance(spec.granularity, PerToken):
            raise ValueError("weights: PerToken is an activation granularity; use PerChannel(0) or PerGroup")
        if observer not in ops.RANGE_METHODS:
            raise ValueError(f"weight observer must be one of {sorted(ops.RANGE_METHODS)}, got {observer!r}")
        self.observer = observer
        self.observer_options = dict(observer_options or {})
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.fixed = False
        self._key: tuple | None = None

    @staticmethod
    def gemm_view(w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0], -1) if w.dim() != 2 else w

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for weight ``w`` (cached; refitted when ``w`` changed)."""
        key = (w.data_ptr(), w._version, tuple(w.shape))
        if self.scale is None or (not self.fixed and key != self._key):
            # ordinary tensors even when the forward runs under torch.inference_mode: the grid
            # outlives the call (QAT, the cache key's version counter)
            with torch.inference_mode(False), torch.no_grad():
                s, z = ops.choose_qparams(self.gemm_view(w.detach()), self.spec, self.observer, **self.observer_options)
            self.scale, self.zero_point = s, z
            self._key = key
        return self.scale, self.zero_point

    def fix_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Pin the grid (it will no longer follow the weight)."""
        self.scale, self.zero_point = scale.detach().clone(), zero_point.detach().clone()
        self.fixed = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        scale, zero_point = self.qparams(w)
        differentiable = torch.is_grad_enabled() and w.requires_grad
        if differentiable or self.active_spec().rounding != "nearest":
            return self.fake_quantize(self.gemm_view(w), scale, zero_point).reshape(w.shape)
        # inference: the fake-quantized weight only changes with the weight or the grid, so it is
        # computed once (calibration, evaluation and GPTQ passes reuse it)
        key = (w.data_ptr(), w._version, tuple(w.shape), scale.data_ptr(), scale._version, zero_point.data_ptr())
        cached = self.__dict__.get("_fq_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                out = self.fake_quantize(self.gemm_view(w), scale, zero_point).reshape(w.shape)
            cached = (key, out)
            self.__dict__["_fq_cache"] = cached
        return cached[1]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", observer={self.observer}" + (", fixed" if self.fixed else "")


class ActQuantizer(Quantizer):
    """Fake-quantizes activations with a range found by calibration (or per tensor, if dynamic).

    States: *uncalibrated* (float pass-through), *observing* (``lb.calibrate``: statistics are
    collected, values pass through unchanged), *calibrated* (fixed ``scale``/``zero_point``).
    A ``spec.dynamic`` quantizer needs no calibration: every tensor gets its own grid
    (per token with ``PerToken()``).
    """

    def __init__(self, spec: QuantSpec, observer: str = "minmax", observer_options: dict | None = None,
                 ste: str = "identity") -> None:
        super().__init__(spec, ste)
        if isinstance(spec.granularity, PerToken) and not spec.dynamic:
            raise ValueError("activations: PerToken() needs dynamic=True (token counts vary between inputs)")
        g = spec.granularity
        if not spec.dynamic and isinstance(g, PerChannel) and g.axis == 0:
            raise ValueError("activations: PerChannel(axis=0) is the batch axis of an activation (one calibrated "
                             "scale per sample of the calibration batch); use PerChannel(axis=-1) for the features of "
                             "a Linear input or PerChannel(axis=1) for the channels of a convolution input")
        if not spec.dynamic and isinstance(g, PerGroup):
            raise ValueError("activations: static PerGroup scales have the activation's shape (batch and sequence "
                             "axes included), which changes from batch to batch; use dynamic=True, or PerChannel(axis=-1)")
        self.observer_name = observer
        self.observer_options = dict(observer_options or {})
        if not spec.dynamic:
            make_observer(observer, spec, **self.observer_options)  # validate the name now
        self.observer = None
        self.observing = False
        self.batches_seen = 0
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    @property
    def calibrated(self) -> bool:
        return self.spec.dynamic or self.scale is not None

    def start_observing(self) -> None:
        if self.spec.dynamic:
            return
        self.observer = make_observer(self.observer_name, self.spec, **self.observer_options)
        self.observing = True
        self.batches_seen = 0

    def finish_observing(self) -> bool:
        """Fix ``(scale, zero_point)`` from the observer; False if it saw nothing."""
        self.observing = False
        if self.spec.dynamic:
            return True
        if self.batches_seen == 0:
            return False
        scale, zero_point = self.observer.qparams()
        self.set_qparams(scale, zero_point)
        return True

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Fix the grid (checked here, once: the forward does not check it again)."""
        scale, zero_point = scale.detach().clone().float(), zero_point.detach().clone().to(torch.int32)
        self._check_values(scale, zero_point)
        self.scale, self.zero_point = scale, zero_point

    def _check_values(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError(f"activation scale must be finite and > 0 everywhere, got {scale.min().item():g} "
                             "(did calibration see only non-finite or constant values?)")
        zlo, zhi = self.spec.number_format.zero_point_range(self.spec)
        if zero_point.numel() and (int(zero_point.min()) < zlo or int(zero_point.max()) > zhi):
            raise ValueError(f"activation zero_point must lie in [{zlo}, {zhi}] for {self.spec}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not x.is_floating_point() or x.numel() == 0:
            return x
        if self.spec.dynamic:
            scale, zero_point = ops.choose_qparams(x.detach(), self.spec, "minmax")
            return self.fake_quantize(x, scale, zero_point)
        if self.observing:
            self.observer.update(x.detach())
            self.batches_seen += 1
            return x
        if self.scale is None:
            return x
        return self.fake_quantize(x, self.scale, self.zero_point)

    def extra_repr(self) -> str:
        state = "dynamic" if self.spec.dynamic else ("observing" if self.observing else
                                                     ("calibrated" if self.scale is not None else "uncalibrated"))
        return super().extra_repr() + f", observer={self.observer_name}, {state}"
