"""Quantizers for quantization-aware training: learned step sizes, stochastic rounding, noise.

:class:`QATWeightQuantizer` and :class:`QATActQuantizer` are drop-in subclasses of the PTQ
quantizers (``lb.qat.prepare`` swaps them in). In **eval mode** they compute exactly what the PTQ
quantizer with the same ``(scale, zero_point)`` computes (round to nearest, scale detached), so the
model that :func:`lowbit.freeze` makes from them (:meth:`to_fixed` hands the learned grid to a
plain quantizer with pinned qparams) gives bit-identical outputs. In **training mode**:

* weights round as ``rounding`` says (``"nearest"`` or ``"stochastic"``, with the quantizer's own
  seeded generator) or, with ``surrogate="noise"``, get uniform noise of one step instead of
  rounding (see :mod:`lowbit.qat.functional`);
* a learned step size (``learn_scale`` / ``learn``) is an ``nn.Parameter`` ``scale`` whose gradient
  is LSQ's ``dy/ds`` times ``g = 1/sqrt(N * Q_P)`` (Esser et al. 2020), or, for activations with
  ``learn="pact"``, PACT's clipped-only gradient (Choi et al. 2018). The zero point stays fixed
  at its calibrated value. The step used in the forward is ``max(scale, tiny)`` so that an
  optimizer step can never make it non-positive.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..modules import ActQuantizer, WeightQuantizer
from ..ops.params import from_rows, to_rows
from .functional import grad_scale, lsq_grad_factor, lsq_init_scale, noise_fake_quantize, pact_fake_quantize

__all__ = ["QATWeightQuantizer", "QATActQuantizer", "ROUNDINGS", "SCALE_INITS", "ACT_LEARNING"]

ROUNDINGS = ("nearest", "stochastic")
SCALE_INITS = ("observer", "lsq")
ACT_LEARNING = ("lsq", "pact", None)


def _effective(scale: torch.Tensor) -> torch.Tensor:
    """The step used: ``scale`` floored at the smallest positive float, with a straight-through gradient.

    ``clamp_min`` alone has zero gradient below the floor, so a learned step that an optimizer
    pushed to <= 0 would never receive a gradient again; here the gradient always reaches ``scale``
    (so the loss can push it back up)."""
    floored = scale.clamp_min(torch.finfo(scale.dtype).tiny)
    return floored.detach() + (scale - scale.detach())   # value: floored exactly; d/dscale: 1


def _make_learnable(module: nn.Module, value: torch.Tensor) -> None:
    """Turn the ``scale`` buffer of ``module`` into an ``nn.Parameter`` holding ``value``."""
    module._buffers.pop("scale", None)
    module.scale = nn.Parameter(value.detach().clone().float())


class _Training:
    """Training-time fake quantization shared by both quantizers (see the module docstring)."""

    rounding: str = "nearest"
    surrogate: str = "ste"
    pact: bool = False
    seed: int = 0

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self.generator
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            self.generator = gen
        return gen

    def _train_fake_quantize(self, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        spec = self.spec if self.rounding == "nearest" else self.spec.replace(rounding=self.rounding)
        random = self.surrogate == "noise" or self.rounding == "stochastic"
        gen = self._generator(x.device) if random else None
        if self.surrogate == "noise":
            return noise_fake_quantize(x, spec, s, z, ste=self.ste, generator=gen)
        if self.pact and s.requires_grad:
            return pact_fake_quantize(x, spec, s, z, ste=self.ste, generator=gen)
        return ops.fake_quantize(x, spec, s, z, ste=self.ste, generator=gen)


class QATWeightQuantizer(_Training, WeightQuantizer):
    """A weight quantizer for QAT, built from a PTQ ``WeightQuantizer`` and the layer's weight.

    Args:
        base: the PTQ quantizer it replaces (spec, observer, pinned grid if any).
        weight: the layer's weight, to initialise the grid.
        learn_scale: learn the step size (LSQ); the zero point is fixed.
        scale_init: ``"observer"`` (the PTQ grid) or ``"lsq"`` (``2 mean|w| / sqrt(Q_P)`` per scale).
        rounding / surrogate / ste / seed: see :func:`lowbit.qat.prepare`.
    """

    def __init__(self, base: WeightQuantizer, weight: torch.Tensor, *, learn_scale: bool = True,
                 scale_init: str = "observer", rounding: str = "nearest", surrogate: str = "ste",
                 ste: str = "identity", seed: int = 0) -> None:
        super().__init__(base.spec.replace(rounding="nearest"), base.observer, base.observer_options, ste)
        self.enabled = base.enabled
        self.rounding, self.surrogate, self.seed = rounding, surrogate, int(seed)
        self.learn_scale = bool(learn_scale)
        self.scale_init = scale_init
        if base.fixed:
            self.fix_qparams(base.scale, base.zero_point)
        s, z = self.qparams(weight)
        if self.learn_scale:
            if scale_init == "lsq":
                rows = to_rows(self.gemm_view(weight.detach()).float(), self.spec)
                s = from_rows(lsq_init_scale(rows, self.spec), self.gemm_view(weight).shape, self.spec)
            zero_point = z.detach().clone()
            _make_learnable(self, s)
            self.zero_point = zero_point
            self.fixed = True  # the grid no longer follows the weight: it is learned
        wv = self.gemm_view(weight)
        self.elements_per_scale = max(wv.numel() // math.prod(self.spec.param_shape(wv.shape)), 1)

    def fix_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Pin the grid; a learned step keeps learning from the new value."""
        if isinstance(self.scale, nn.Parameter):
            with torch.no_grad():
                self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero_point = zero_point.detach().clone()
            return
        super().fix_qparams(scale, zero_point)

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.scale, nn.Parameter):
            return _effective(self.scale).detach(), self.zero_point
        return super().qparams(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        wv = self.gemm_view(w)
        if not self.training:
            s, z = self.qparams(w)
            return self.fake_quantize(wv, s, z).reshape(w.shape)
        if isinstance(self.scale, nn.Parameter):
            s = grad_scale(_effective(self.scale), lsq_grad_factor(self.elements_per_scale, self.spec))
            z = self.zero_point
        else:
            s, z = self.qparams(w)
        return self._train_fake_quantize(wv, s, z).reshape(w.shape)

    def to_fixed(self) -> WeightQuantizer:
        """A plain ``WeightQuantizer`` computing what this one computes in eval mode (grid pinned
        if it was learned or pinned, else refitted from the weight exactly as PTQ does)."""
        out = WeightQuantizer(self.spec, self.observer, self.observer_options, ste=self.ste)
        out.enabled = self.enabled
        if self.fixed:
            out.fix_qparams(_effective(self.scale).detach(), self.zero_point)
        return out.train(self.training)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", learn_scale={self.learn_scale}, rounding={self.rounding}, "
                f"surrogate={self.surrogate}")


class QATActQuantizer(_Training, ActQuantizer):
    """An activation quantizer for QAT, built from a calibrated (or dynamic) PTQ ``ActQuantizer``.

    Args:
        learn: ``"lsq"`` (learned step size), ``"pact"`` (learned clipping level), or ``None``
            (the calibrated range stays fixed). Needs a calibrated static quantizer.
        ste / seed: see :func:`lowbit.qat.prepare`. Activations always round to nearest.
    """

    def __init__(self, base: ActQuantizer, *, learn: str | None = "lsq", ste: str = "identity",
                 seed: int = 0) -> None:
        super().__init__(base.spec.replace(rounding="nearest"), base.observer_name, base.observer_options, ste)
        self.enabled = base.enabled
        self.seed = int(seed)
        if learn not in ACT_LEARNING:
            raise ValueError(f"learn must be one of {ACT_LEARNING}, got {learn!r}")
        if learn is not None and (base.spec.dynamic or base.scale is None):
            learn = None  # nothing to learn: dynamic ranges, or a layer calibration never reached
        self.learn = learn
        self.pact = learn == "pact"
        if base.scale is not None:
            self.set_qparams(base.scale, base.zero_point)
        if learn is not None:
            _make_learnable(self, self.scale)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        if isinstance(self.scale, nn.Parameter):
            with torch.no_grad():
                self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero_point = zero_point.detach().clone().to(torch.int32)
            return
        super().set_qparams(scale, zero_point)

    def finish_observing(self) -> bool:
        if not isinstance(self.scale, nn.Parameter):
            return super().finish_observing()
        self.observing = False
        if self.batches_seen == 0:
            return False
        self.set_qparams(*self.observer.qparams())
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.scale, nn.Parameter) or self.observing or self.spec.dynamic:
            return super().forward(x)  # a fixed range (PTQ behaviour), or calibrating
        if not self.enabled or not x.is_floating_point() or x.numel() == 0:
            return x
        if not self.training:
            return self.fake_quantize(x, _effective(self.scale).detach(), self.zero_point)
        per_sample = x.numel() // (x.shape[0] if x.dim() > 1 else 1)   # LSQ's N_F: features per sample
        g = lsq_grad_factor(max(per_sample // self.scale.numel(), 1), self.spec)
        return self._train_fake_quantize(x, grad_scale(_effective(self.scale), g), self.zero_point)

    def to_fixed(self) -> ActQuantizer:
        """A plain ``ActQuantizer`` with this one's (learned) range, computing the same in eval mode."""
        out = ActQuantizer(self.spec, self.observer_name, self.observer_options, ste=self.ste)
        out.enabled = self.enabled
        if self.scale is not None:
            out.set_qparams(_effective(self.scale).detach(), self.zero_point)
        return out.train(self.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", learn={self.learn}"
