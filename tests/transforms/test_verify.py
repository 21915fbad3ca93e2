"""Function-preserving transforms check themselves on a reference batch; norms are folded by their
real form (x * w, or Gemma's x * (1 + w)), and a norm of another form is not folded."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.transforms.dataflow import norm_offset
from lowbit.transforms.verify import check_preserved


class GemmaRMSNorm(nn.Module):
    """transformers' Gemma RMSNorm: ``x / rms(x) * (1 + w)``."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


class ExpRMSNorm(nn.Module):
    """A norm of another form, ``x / rms(x) * exp(w)``: a factor cannot be folded into ``w`` linearly."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.exp(self.weight)


class Block(nn.Module):
    def __init__(self, norm, d=16):
        super().__init__()
        self.norm = norm
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        h = self.norm(x)
        return self.out(torch.relu(self.q(h)) * self.k(h))


def _batches():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 8, 16, generator=g) for _ in range(2)]
    for x in xs:
        x[..., 3] *= 30                                   # an outlier channel
    return xs


def test_norm_offset():
    assert norm_offset(nn.LayerNorm(8)) == 0.0
    assert norm_offset(nn.RMSNorm(8)) == 0.0
    assert norm_offset(GemmaRMSNorm(8)) == 1.0
    assert norm_offset(ExpRMSNorm(8)) is None


@pytest.mark.parametrize("transform", ["smooth_quant", "awq"])
@pytest.mark.parametrize("norm,folds", [(GemmaRMSNorm, True), (ExpRMSNorm, False), (nn.LayerNorm, True)])
def test_smoothing_keeps_the_function(transform, norm, folds):
    torch.manual_seed(0)
    m = Block(norm(16)).eval()
    xs = _batches()
    if transform == "smooth_quant":
        s = lb.transforms.smooth_quant(m, xs, alpha=0.5)
        info = s.lowbit_smoothing
    else:
        s = lb.transforms.awq(m, xs, weights=lb.QuantSpec(bits=3, granularity=lb.PerChannel(0)), grid=4)
        info = s.lowbit_awq
    assert (info.layers["q"].how == "folded into norm") == folds
    with torch.no_grad():
        ref, out = m(xs[1]), s(xs[1])
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_check_preserved_names_the_layers():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 4))
    b = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"changed its output .* the layers it changed: 0"):
        check_preserved(a, b, torch.randn(2, 4), lambda m, x: m(x), "a transform", ["0"])
    assert check_preserved(a, a, torch.randn(2, 4), lambda m, x: m(x), "a transform", ["0"]) == 0.0
