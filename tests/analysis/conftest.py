"""Small models trained for a few steps on scikit-learn digits, shared by the analysis tests."""
import functools

import pytest
import torch
from torch import nn

import lowbit as lb

A8 = lb.QuantSpec(bits=8, symmetric=False)


class ResCNN(nn.Module):
    """conv-BN-ReLU, a residual block with BN, max and average pooling, a linear classifier."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.b2 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x):
        h = self.relu(self.b1(self.c1(x)))
        h = torch.relu(h + self.b2(self.c2(h)))
        return self.fc(self.avg(self.pool(h)).flatten(1))


@functools.lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x[:1400], torch.tensor(y[:1400]), x[1400:], torch.tensor(y[1400:])


def train(model: nn.Module, steps: int = 150, weight_decay: float = 0.0, seed: int = 0, lr: float = 1e-2,
          flat: bool = False) -> nn.Module:
    xtr, ytr, _, _ = _digits()
    if flat:
        xtr = xtr.flatten(1)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@functools.lru_cache(maxsize=None)
def _rescnn():
    torch.manual_seed(0)
    return train(ResCNN())


@pytest.fixture
def rescnn():
    """A trained ResCNN (a fresh copy per test) and the digits test split."""
    import copy
    _, _, xte, yte = _digits()
    return copy.deepcopy(_rescnn()), xte, yte


def _quantized(model, bits=8, act_bits=8, calib=None, **kw):
    """``lb.quantize`` + calibration on the first 400 training digits."""
    acts = None if act_bits is None else lb.QuantSpec(bits=act_bits, symmetric=False)
    q = lb.quantize(model, weights=lb.QuantSpec(bits=bits, granularity=lb.PerChannel(0)), activations=acts, **kw)
    if acts is not None:
        with lb.calibrate(q):
            q(_digits()[0][:400] if calib is None else calib)
    return q


@pytest.fixture
def digits():
    """``(x_train, y_train, x_test, y_test)`` of scikit-learn digits as ``(N, 1, 8, 8)`` tensors."""
    return _digits()


@pytest.fixture
def quantized():
    """``quantized(model, bits=8, act_bits=8, **quantize_kwargs)``: quantize and calibrate."""
    return _quantized


@pytest.fixture
def trained():
    """``trained(model, steps=150, weight_decay=0.0, seed=0, lr=1e-2, flat=False)`` on digits."""
    return train
