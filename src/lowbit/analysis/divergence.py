"""How far the quantized model's outputs moved: exact KL, its second-order prediction, MSE, cosine.

With float logits ``z``, quantized logits ``z' = z + d``, ``p = softmax(z)`` and
``q = softmax(z')`` (over the last dimension), the exact divergence is::

    KL(p || q) = sum_k p_k (log p_k - log q_k)  =  log E_p[exp(d)] - E_p[d]

i.e. the cumulant generating function ``K(t) = log E_p[exp(t d)]`` of ``d`` under ``p``, minus its
first-order term, at ``t = 1``. Expanding ``K`` in cumulants::

    KL = K(1) - K'(0) = Var_p[d] / 2 + kappa_3 / 6 + ...          (kappa_3: third cumulant of d)

so for small perturbations ``KL ~= Var_p[d] / 2`` (:func:`kl_predicted`), with a relative error of
order ``|d|`` (it vanishes as the perturbation shrinks). Both are invariant to adding a constant to
all logits of a sample (softmax and the variance ignore it). This is the Fisher-information
approximation of the divergence (the Fisher metric of the softmax is ``diag(p) - p p^T``; Amari,
"Information Geometry and Its Applications", 2016), used to predict the accuracy cost of
quantization noise. Everything is computed in float64 with ``log_softmax`` (no overflow for large
logits).

For outputs that are not logits (regressions, embeddings) :func:`output_mse` and
:func:`cosine_distance` measure the change instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["kl", "kl_predicted", "KLSummary", "kl_summary", "output_mse", "cosine_distance", "METRICS",
           "divergence"]

METRICS = ("kl", "mse", "cosine")


def _check_pair(z_float: torch.Tensor, z_quant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, z in (("z_float", z_float), ("z_quant", z_quant)):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of outputs, got {type(z).__name__}")
        if not (z.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor, got {z.dtype}")
        if z.dim() == 0:
            raise ValueError(f"{name} must have a last dimension (classes or features), got a scalar")
    if z_float.shape != z_quant.shape:
        raise ValueError(f"z_float has shape {tuple(z_float.shape)} but z_quant has {tuple(z_quant.shape)}; "
                         "pass the outputs of the float and the quantized model on the same inputs")
    return z_float.detach().to(torch.float64), z_quant.detach().to(torch.float64)


def kl(z_float: torch.Tensor, z_quant: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(softmax(z_float) || softmax(z_quant))`` in nats, per sample (over the last dim).

    Returns a float64 tensor of shape ``z_float.shape[:-1]``.
    """
    zf, zq = _check_pair(z_float, z_quant)
    lp = torch.log_softmax(zf, dim=-1)
    lq = torch.log_softmax(zq, dim=-1)
    p = lp.exp()
    # p * (lp - lq) with the convention 0 * anything = 0 (lq may be -inf only where z_quant is)
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return terms.sum(dim=-1).clamp_min(0.0)


def kl_predicted(z_float: torch.Tensor, z_quant: torch.Tensor) -> torch.Tensor:
    """Second-order prediction ``Var_p[z_quant - z_float] / 2`` (nats), per sample; ``p = softmax(z_float)``."""
    zf, zq = _check_pair(z_float, z_quant)
    p = torch.softmax(zf, dim=-1)
    d = zq - zf
    mean = (p * d).sum(dim=-1, keepdim=True)
    return 0.5 * (p * (d - mean).square()).sum(dim=-1)


@dataclass(frozen=True)
class KLSummary:
    """KL between float and quantized predictions, over all samples.

    ``relative_error = |mean(predicted) - mean(exact)| / mean(exact)`` (how well the second-order
    formula predicts the average divergence); ``median_sample_relative_error`` is the median over
    samples of ``|predicted - exact| / exact`` (samples with ``exact == 0`` skipped).
    """

    kl: float
    kl_predicted: float
    relative_error: float
    median_sample_relative_error: float
    samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def kl_summary(z_float: torch.Tensor, z_quant: torch.Tensor) -> KLSummary:
    """Mean exact and predicted KL and the relative error of the prediction."""
    exact = kl(z_float, z_quant).reshape(-1)
    pred = kl_predicted(z_float, z_quant).reshape(-1)
    if exact.numel() == 0:
        raise ValueError("z_float holds no sample")
    m_exact, m_pred = float(exact.mean()), float(pred.mean())
    rel = abs(m_pred - m_exact) / m_exact if m_exact > 0 else (0.0 if m_pred == 0 else float("inf"))
    pos = exact > 0
    per = ((pred[pos] - exact[pos]).abs() / exact[pos]) if bool(pos.any()) else torch.zeros(1, dtype=torch.float64)
    return KLSummary(kl=m_exact, kl_predicted=m_pred, relative_error=rel,
                     median_sample_relative_error=float(per.median()), samples=int(exact.numel()))


def output_mse(z_float: torch.Tensor, z_quant: torch.Tensor) -> torch.Tensor:
    """Mean squared change of the outputs, per sample (over the last dim)."""
    zf, zq = _check_pair(z_float, z_quant)
    return (zq - zf).square().mean(dim=-1)


def cosine_distance(z_float: torch.Tensor, z_quant: torch.Tensor) -> torch.Tensor:
    """``1 - cos(z_float, z_quant)`` per sample (over the last dim); 0 when the directions agree."""
    zf, zq = _check_pair(z_float, z_quant)
    return (1.0 - torch.nn.functional.cosine_similarity(zf, zq, dim=-1, eps=1e-30)).clamp_min(0.0)


def divergence(z_float: torch.Tensor, z_quant: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-sample ``metric`` (``"kl"``, ``"mse"`` or ``"cosine"``) between two outputs."""
    if metric == "kl":
        return kl(z_float, z_quant)
    if metric == "mse":
        return output_mse(z_float, z_quant)
    if metric == "cosine":
        return cosine_distance(z_float, z_quant)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
