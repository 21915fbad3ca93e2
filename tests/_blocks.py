"""Small transformer-style blocks shared by the tests of SmoothQuant, AWQ and checkpoints.

Import as ``from _blocks import PreLN, PostLN`` (``tests/`` is on pytest's ``pythonpath``).
"""
import torch
from torch import nn


class PreLN(nn.Module):
    """x + W_o(attention mix of q, k, v of LN1(x)), then x + fc2(gelu(fc1(LN2(x)))): the norm outputs
    feed only linear layers (OPT / LLaMA style), so smoothing factors fold into the norms.

    ``LN1``'s gain is ``U(0.5, 1.5)`` with an outlier channel 3 (``outlier``); ``biased`` names the
    norm that gets a random bias; the feed-forward width is ``ffn * d``.
    """

    def __init__(self, d=16, seed=0, outlier=30.0, ffn=4, biased="ln1"):
        super().__init__()
        torch.manual_seed(seed)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        with torch.no_grad():
            self.ln1.weight.copy_(torch.rand(d) + 0.5)
            self.ln1.weight[3] = outlier
            getattr(self, biased).bias.copy_(torch.randn(d))
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ffn * d), nn.Linear(ffn * d, d)

    def forward(self, x):
        h = self.ln1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 4.0, dim=-1) @ self.v(h)
        x = x + self.o(att)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class PostLN(nn.Module):
    """BERT style: h = LN(x); out = LN2(h + W_o(v(h))): the norm output is also the residual, so
    factors must stay explicit. ``second_norm=False`` applies ``LN`` twice; ``dropout`` adds an
    ``nn.Dropout`` after the first norm (identity in eval mode)."""

    def __init__(self, d=16, seed=1, second_norm=True, dropout=False):
        super().__init__()
        torch.manual_seed(seed)
        self.ln = nn.LayerNorm(d)
        if second_norm:
            self.ln2 = nn.LayerNorm(d)
        if dropout:
            self.drop = nn.Dropout(0.1)
        self.v, self.o = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        if hasattr(self, "drop"):
            h = self.drop(h)
        return getattr(self, "ln2", self.ln)(h + self.o(self.v(h)))
