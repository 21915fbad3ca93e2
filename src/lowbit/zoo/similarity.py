"""Agreement between two sets of sentence embeddings: cosine per sentence and Spearman of pairs.

For reference embeddings ``E`` and candidate embeddings ``F`` (one row per sentence):

- per-sentence cosine ``c_i = <E_i, F_i> / (|E_i| |F_i|)``; reported as mean and min over ``i``;
- pairwise similarities ``S_ij = cos(E_i, E_j)`` and ``T_ij = cos(F_i, F_j)`` for ``i < j``, and
  their Spearman rank correlation ``rho = pearson(rank(S), rank(T))`` with tied values given their
  average rank (Spearman 1904; the definition ``scipy.stats.spearmanr`` uses). ``rho = 1`` means the
  candidate orders every pair of sentences exactly as the reference does (what retrieval needs).

Pure torch in float64; no SciPy needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["EmbeddingAgreement", "compare_embeddings", "pairwise_cosine", "rankdata", "spearman"]


@dataclass(frozen=True)
class EmbeddingAgreement:
    cosine_mean: float
    cosine_min: float
    spearman: float


def _as_matrix(arg: str, e) -> torch.Tensor:
    if not isinstance(e, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor of shape (sentences, dim); got {type(e).__name__}")
    if e.ndim != 2 or e.shape[0] < 1:
        raise ValueError(f"{arg} must have shape (sentences, dim) with at least one sentence; got {tuple(e.shape)}")
    return e.detach().to(torch.float64).cpu()


def pairwise_cosine(e: torch.Tensor) -> torch.Tensor:
    """``cos(e_i, e_j)`` for all ``i < j`` (row-major upper triangle), a 1-D float64 tensor."""
    e = _as_matrix("e", e)
    u = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = u @ u.T
    i, j = torch.triu_indices(len(e), len(e), offset=1)
    return sim[i, j]


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor with ties given their average rank (float64)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 1:
        raise ValueError("x must be a 1-D torch.Tensor")
    _, inverse, counts = torch.unique(x.to(torch.float64), sorted=True, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).to(torch.float64)      # rank of the last member of each tie group
    avg = last - (counts.to(torch.float64) - 1) / 2        # mean of ranks last-count+1 .. last
    return avg[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equal-length 1-D tensors (NaN if either is constant)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.ndim != 1 or a.shape != b.shape:
        raise ValueError("a and b must be 1-D torch.Tensors of the same length")
    if len(a) < 2:
        raise ValueError(f"spearman needs at least 2 values; got {len(a)}")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float("nan") if denom == 0 else float((ra @ rb).item() / denom)


def compare_embeddings(reference: torch.Tensor, candidate: torch.Tensor) -> EmbeddingAgreement:
    """Mean and min per-sentence cosine, and the Spearman of pairwise similarities (needs >= 3 sentences)."""
    e, f = _as_matrix("reference", reference), _as_matrix("candidate", candidate)
    if e.shape != f.shape:
        raise ValueError(f"reference and candidate must have the same shape; got {tuple(e.shape)} and {tuple(f.shape)}")
    cos = torch.nn.functional.cosine_similarity(e, f, dim=1, eps=1e-12)
    rho = spearman(pairwise_cosine(e), pairwise_cosine(f)) if len(e) >= 3 else float("nan")
    return EmbeddingAgreement(cosine_mean=cos.mean().item(), cosine_min=cos.min().item(), spearman=rho)
