"""The training-time arithmetic of quantization-aware training (pure functions).

With ``v = x / s`` the value on the grid and ``z`` the zero point, every surrogate below computes
in the forward pass ::

    y = (clamp(r(v) + z, qmin, qmax) - z) * s

and differs in ``r`` and in the gradients it lets through:

* **Straight-through rounding** (Bengio et al. 2013): ``r(v) = round(v)`` (nearest, or stochastic:
  ``floor(v) + Bernoulli(v - floor(v))``, Gupta et al. 2015, unbiased ``E[r(v)] = v``), and
  ``dr/dv := 1``. This is :func:`lowbit.ops.fake_quantize`.
* **Additive pseudo-quantization noise** (:func:`noise_fake_quantize`): ``r(v) = v + u`` with
  ``u ~ U(-1/2, 1/2)`` drawn afresh each call, i.e. noise ``U(-s/2, s/2)`` in real units: the
  rounding error of a fine grid modelled as independent uniform noise (Widrow's model), mean 0,
  variance ``s^2 / 12``. The forward is differentiable as it stands (no STE needed inside the
  grid). Défossez et al. 2022, "Differentiable Model Compression via Pseudo Quantization Noise"
  (DiffQ); Baskin et al. 2021, "NICE: Noise Injection and Clamping Estimation for Neural Network
  Quantization".

Gradient with respect to the step size ``s`` (when ``s`` requires grad):

* **LSQ** (Esser et al. 2020, "Learned Step Size Quantization", ICLR): ``dy/ds = r(v) - v`` inside
  the grid, ``qmin - z`` / ``qmax - z`` where ``x`` saturated. The loss gradient is multiplied by
  ``g = 1 / sqrt(N * Q_P)`` (:func:`lsq_grad_factor`; ``N`` elements share the step, ``Q_P = qmax``)
  so that the step size learns at the same relative rate as the weights; :func:`grad_scale`
  applies ``g`` to the gradient only. Under the noise surrogate ``r(v) - v = u``.
* **PACT** (Choi et al. 2018, "PACT: Parameterized Clipping Activation for Quantized Neural
  Networks"): the clipping level ``alpha = (qmax - z) * s`` is learned from the saturated
  elements only: ``dy/ds = qmax - z`` (resp. ``qmin - z``) where ``x`` saturated, 0 inside
  (:func:`pact_fake_quantize`; PACT's ``dy/dalpha = 1[x >= alpha]``).
"""
from __future__ import annotations

import math

import torch

from .. import ops
from ..ops.grid import prepare_qparams, round_to_grid
from ..spec import QuantSpec

__all__ = ["grad_scale", "lsq_grad_factor", "lsq_init_scale", "uniform_noise", "noise_fake_quantize",
           "pact_fake_quantize", "SURROGATES"]

SURROGATES = ("ste", "noise")


class _GradScale(torch.autograd.Function):
    """Forward: ``s`` exactly (bit for bit). Backward: ``g * grad``."""

    @staticmethod
    def forward(ctx, s, g):
        ctx.g = g
        return s.view_as(s)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    """``s`` in the forward pass, gradient multiplied by ``g`` in the backward pass.

    LSQ writes it as ``(s - s*g).detach() + s*g``; that sum can differ from ``s`` by an ulp, so a
    custom autograd function returns ``s`` itself and only scales the gradient.
    """
    return _GradScale.apply(s, float(g))


def lsq_grad_factor(elements_per_scale: int, spec: QuantSpec) -> float:
    """LSQ's gradient scale ``g = 1 / sqrt(N * Q_P)``, ``Q_P = qmax`` (at least 1)."""
    return 1.0 / math.sqrt(max(int(elements_per_scale), 1) * max(spec.qmax, 1))


def lsq_init_scale(rows: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """LSQ's initial step ``2 * mean(|w|) / sqrt(Q_P)`` per row of ``rows`` (``[num_scales, N]``)."""
    s = 2 * rows.abs().mean(dim=1) / math.sqrt(max(spec.qmax, 1))
    return s.clamp_min(torch.finfo(s.dtype).tiny)


def uniform_noise(shape, generator: torch.Generator | None, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """``U(-1/2, 1/2)`` noise of ``shape`` (one grid step wide), from ``generator`` if given."""
    return torch.rand(shape, generator=generator, dtype=dtype, device=device) - 0.5


def _prepare(x, spec, scale, zero_point):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return prepare_qparams(x, spec, scale, zero_point)


def noise_fake_quantize(x: torch.Tensor, spec: QuantSpec, scale, zero_point, ste: str = "identity",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``(clamp(x/s + u + z, qmin, qmax) - z) * s`` with ``u ~ U(-1/2, 1/2)``: noise instead of rounding.

    Gradients: ``dy/dx = 1`` inside the grid; where ``x`` saturated, 1 (``ste="identity"``) or 0
    (``"clipped"``). If ``scale`` requires grad, ``dy/ds = u`` inside and ``qmin - z`` / ``qmax - z``
    where saturated (LSQ's gradient with the noise as the rounding error).
    """
    if ste not in ops.STE_MODES:
        raise ValueError(f"ste must be one of {ops.STE_MODES}, got {ste!r}")
    s, z = _prepare(x, spec, scale, zero_point)
    xf = x.to(s.dtype)
    u = uniform_noise(xf.shape, generator, xf.dtype, xf.device)
    v = xf / s + u
    q = torch.clamp(v + z, spec.qmin, spec.qmax)
    y = (q - z) * s
    if ste == "identity":  # pass dL/dx through where the clamp cut it
        outside = ((v + z) != q).detach()
        y = y + (xf - xf.detach()) * outside
    return y.to(x.dtype)


def pact_fake_quantize(x: torch.Tensor, spec: QuantSpec, scale, zero_point, ste: str = "identity",
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Fake quantization whose step learns from the clipped elements only (PACT, see module docstring).

    Forward identical to :func:`lowbit.ops.fake_quantize` (rounding per ``spec.rounding``).
    ``dy/dx`` is straight-through (``ste`` as in ``ops.fake_quantize``); ``dy/ds`` is ``qmin - z`` /
    ``qmax - z`` where ``x`` saturated and 0 inside the grid.
    """
    if ste not in ops.STE_MODES:
        raise ValueError(f"ste must be one of {ops.STE_MODES}, got {ste!r}")
    s, z = _prepare(x, spec, scale, zero_point)
    xf = x.to(s.dtype)
    sd = s.detach()
    v = round_to_grid(xf.detach() / sd, spec.rounding, generator) + z
    q = torch.clamp(v, spec.qmin, spec.qmax)
    outside = v != q
    y = (q - z) * sd
    x_pass = xf - xf.detach()
    if ste == "clipped":
        x_pass = x_pass * (~outside)
    y = y + x_pass + (q - z) * (s - sd) * outside
    return y.to(x.dtype)
