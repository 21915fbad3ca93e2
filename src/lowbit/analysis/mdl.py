"""Description length: the model and the data, priced in bits.

**Two-part code** (Rissanen 1978; Hinton and van Camp, "Keeping neural networks simple by
minimizing the description length of the weights", COLT 1993). Sending labels ``y`` of inputs
``x`` with a model costs ``L(model) + L(data | model)`` bits:

* ``L(data | model) = -sum_i log2 softmax(f(x_i))_{y_i}``: the negative log-likelihood in bits, what
  an arithmetic coder driven by the model's predictions needs;
* ``L(model)``: the integer weight codes under their empirical distribution, per layer
  ``n * H(codes)`` with ``H = -sum_c f_c log2 f_c`` (what an entropy coder of the layer's codes
  needs, the table itself not counted), plus scales and zero points at their stored width, plus
  every float parameter or buffer left (biases, activation grids, unquantized layers) at its width.
  ``bits_per_weight = (codes + scales and zero points) / weights``.

**Regularisers as code lengths.** A weight ``w`` on a grid of step ``D`` needs
``-log2 P(bin of w)`` bits under a prior density ``p``, and ``P(bin) = int_{w-D/2}^{w+D/2} p ~= p(w) D``::

    Laplace  p(w) = exp(-|w|/b) / (2b)          -log2 p(w) = |w| / (b ln 2) + log2(2b)
    Gaussian p(w) = N(w; 0, s^2)                -log2 p(w) = w^2 / (2 s^2 ln 2) + log2(2 pi s^2) / 2

so an L1 penalty ``lam * sum |w|`` (in nats, added to the NLL) is the Laplace code length with
``b = 1/lam`` and L2 weight decay ``lam * sum w^2`` the Gaussian one with ``s^2 = 1/(2 lam)``, up to
the constant ``-log2 D`` per weight (MacKay, "A practical Bayesian framework for backpropagation
networks", 1992): regularised training minimises a two-part code length. :func:`prior_code_length`
evaluates it with the exact bin mass ``F(w + D/2) - F(w - D/2)`` (never more than 1, stable in the
tails), at the maximum-likelihood ``b = mean |w|`` / ``s^2 = mean w^2`` unless a scale is given.
Small weights cost few bits, so a regulariser that pulls weights towards 0 and trims the outliers
is also one that makes the weights cheap, and easy, to quantize.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..modules import QuantLayer
from ..ops.params import broadcast_param
from ..quantize import quant_layers
from .batches import as_batch_list, output_tensor, run_batch

__all__ = ["LayerCode", "DescriptionLength", "description_length", "prior_code_length", "empirical_entropy",
           "data_code_length", "penalty_scale"]

LN2 = math.log(2.0)


def empirical_entropy(codes: torch.Tensor) -> float:
    """``H = -sum_c f_c log2 f_c`` of the integer values in ``codes`` (bits per element)."""
    if codes.numel() == 0:
        return 0.0
    _, counts = torch.unique(codes.reshape(-1), return_counts=True)
    f = counts.double() / codes.numel()
    return float(-(f * torch.log2(f)).sum())


def penalty_scale(prior: str, lam: float) -> float:
    """The prior scale a penalty weight ``lam`` implies: Laplace ``b = 1/lam``, Gaussian ``s = sqrt(1/(2 lam))``."""
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam!r}")
    if prior == "laplace":
        return 1.0 / lam
    if prior == "gaussian":
        return math.sqrt(1.0 / (2.0 * lam))
    raise ValueError(f"prior must be 'laplace' or 'gaussian', got {prior!r}")


def _log_bin_mass(t: torch.Tensor, h: torch.Tensor, prior: str, scale: float) -> torch.Tensor:
    """``log P(|w| - h < W < |w| + h)``-style bin mass for ``t = |w|`` (natural log, float64)."""
    if prior == "laplace":
        inner = t < h   # the bin contains 0: 1 - P(W < -(h - t)) - P(W > h + t)
        far = -(t - h) / scale + math.log(0.5) + torch.log(-torch.expm1(-2 * h / scale))
        near = torch.log(-0.5 * torch.expm1(-(h - t).clamp_min(0) / scale) - 0.5 * torch.expm1(-(h + t) / scale))
        return torch.where(inner, near, far)
    lo = torch.special.log_ndtr(-(t - h) / scale)     # log P(W > t - h)
    hi = torch.special.log_ndtr(-(t + h) / scale)     # log P(W > t + h)
    return lo + torch.log(-torch.expm1((hi - lo).clamp_max(-1e-300)))


def prior_code_length(w: torch.Tensor, step: torch.Tensor | float, prior: str = "gaussian",
                      scale: float | None = None) -> float:
    """Bits to code ``w`` (values on a grid of ``step``) under a zero-mean Laplace or Gaussian prior.

    ``scale`` is ``b`` (Laplace) or ``s`` (Gaussian); default: the maximum-likelihood fit to ``w``.
    """
    if prior not in ("laplace", "gaussian"):
        raise ValueError(f"prior must be 'laplace' or 'gaussian', got {prior!r}")
    w64 = w.detach().double().reshape(-1) if isinstance(w, torch.Tensor) else torch.as_tensor(w, dtype=torch.float64)
    h = (torch.as_tensor(step, dtype=torch.float64).expand_as(w.detach()).reshape(-1) / 2).to(w64.device)
    if not bool((h > 0).all()):
        raise ValueError("step must be > 0 everywhere")
    if scale is None:
        scale = float(w64.abs().mean()) if prior == "laplace" else float(w64.square().mean().sqrt())
        scale = max(scale, 1e-12)
    elif not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    return float(-_log_bin_mass(w64.abs(), h, prior, scale).sum() / LN2)


@dataclass
class LayerCode:
    """Code lengths of one quantized layer's weights (bits)."""

    name: str
    weights: int
    bits: int
    stored_bits: int          # n * spec.bits, as stored (packed)
    entropy_bits: float       # n * H(codes)
    side_bits: int            # scales and zero points
    laplace_bits: float       # code length under the ML Laplace prior at the grid step
    gaussian_bits: float      # ... and under the ML Gaussian prior

    @property
    def entropy_per_weight(self) -> float:
        return self.entropy_bits / self.weights if self.weights else 0.0


@dataclass
class DescriptionLength:
    """Two-part code length (bits) of a quantized model and, with labels, of the data given it."""

    layers: list[LayerCode]
    other_bits: int                      # float parameters/buffers outside the quantized weights
    data_bits: float | None = None       # NLL of the labels in bits
    samples: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def weights(self) -> int:
        return sum(c.weights for c in self.layers)

    @property
    def model_bits(self) -> float:
        return sum(c.entropy_bits + c.side_bits for c in self.layers) + self.other_bits

    @property
    def total_bits(self) -> float | None:
        return None if self.data_bits is None else self.model_bits + self.data_bits

    @property
    def bits_per_weight(self) -> float:
        """Entropy-coded codes plus scales and zero points, per quantized weight."""
        return sum(c.entropy_bits + c.side_bits for c in self.layers) / max(self.weights, 1)

    @property
    def stored_bits_per_weight(self) -> float:
        return sum(c.stored_bits + c.side_bits for c in self.layers) / max(self.weights, 1)

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "layers"}
        d["layers"] = [dict(asdict(c), entropy_per_weight=c.entropy_per_weight) for c in self.layers]
        d.update(weights=self.weights, model_bits=self.model_bits, total_bits=self.total_bits,
                 bits_per_weight=self.bits_per_weight, stored_bits_per_weight=self.stored_bits_per_weight,
                 data_bits_per_sample=None if self.data_bits is None or not self.samples
                 else self.data_bits / self.samples)
        return d


def _layer_code(name: str, layer: QuantLayer) -> LayerCode:
    qt = layer.qweight
    codes = qt.int_repr()
    spec = qt.spec
    step = broadcast_param(qt.scale.double(), codes.shape, spec)
    values = qt.dequantize().double()
    side = sum(t.numel() * t.element_size() * 8 for t in (qt.scale, qt.zero_point))
    n = codes.numel()
    return LayerCode(name=name, weights=n, bits=spec.bits, stored_bits=n * spec.bits,
                     entropy_bits=n * empirical_entropy(codes), side_bits=side,
                     laplace_bits=prior_code_length(values, step, "laplace") + 32,
                     gaussian_bits=prior_code_length(values, step, "gaussian") + 32)


def _other_bits(q: nn.Module, names: list[str]) -> int:
    skip = tuple(f"{n}.{s}" for n in names for s in ("weight", "weight_codes", "weight_scale", "weight_zero_point",
                                                     "weight_quant."))
    total = 0
    for key, t in q.state_dict().items():
        if key.startswith(skip) or key.endswith("num_batches_tracked") or not isinstance(t, torch.Tensor):
            continue
        total += t.numel() * t.element_size() * 8
    return total


@torch.no_grad()
def data_code_length(model: nn.Module, batches, labels: torch.Tensor) -> float:
    """``-sum_i log2 softmax(model(x_i))_{y_i}`` over the batches (bits)."""
    batches = as_batch_list(batches)
    was = model.training
    model.eval()
    try:
        z = torch.cat([output_tensor(run_batch(model, b)).detach() for b in batches]).double()
    finally:
        model.train(was)
    labels = _check_labels(labels, z)
    return float(-torch.log_softmax(z, dim=-1).gather(-1, labels.reshape(-1, 1).to(z.device)).sum() / LN2)


def _check_labels(labels, z: torch.Tensor) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        raise TypeError("labels must be an integer tensor of class indices, one per sample")
    if z.dim() != 2 or labels.reshape(-1).numel() != z.shape[0]:
        raise ValueError(f"labels has {labels.numel()} entries but the model gave outputs of shape "
                         f"{tuple(z.shape)}; pass one class index per sample of the batches")
    if int(labels.min()) < 0 or int(labels.max()) >= z.shape[1]:
        raise ValueError(f"labels must lie in [0, {z.shape[1] - 1}] (the model's classes)")
    return labels.reshape(-1).long()


def description_length(q: nn.Module, batches=None, labels: torch.Tensor | None = None) -> DescriptionLength:
    """Code lengths of the quantized model ``q`` and (given ``batches`` and ``labels``) of the data."""
    layers = quant_layers(q)
    if not layers:
        raise ValueError("q has no quantized layer; pass the model returned by lb.quantize")
    with torch.no_grad():
        codes = [_layer_code(n, l) for n, l in layers]
    dl = DescriptionLength(layers=codes, other_bits=_other_bits(q, [n for n, _ in layers]))
    if labels is not None:
        if batches is None:
            raise ValueError("labels were given without batches; pass the inputs the labels belong to")
        dl.data_bits = data_code_length(q, batches, labels)
        dl.samples = int(labels.numel())
    return dl
