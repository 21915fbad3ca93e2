"""The built-in small CNNs, made of standard ``torch.nn`` modules only.

Every convolution is followed by BatchNorm on purpose (folding BN into the convolution is part of
post-training quantization, Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018) and by a plain ``nn.ReLU``. Each module
instance is used once, so forward hooks and module swaps see every layer separately; both models
trace with ``torch.fx.symbolic_trace``. The classifier is ``model.classifier`` (an ``nn.Linear``),
so ``exclude=["classifier"]`` keeps it float.

``DigitsCNN`` (input ``(N, 1, 8, 8)``)::

    [Conv2d 3x3 -> BN -> ReLU] x2 (16 ch) -> MaxPool 2 -> Conv2d 3x3 (32 ch) -> BN -> ReLU
    -> MaxPool 2 -> Flatten (32*2*2) -> Linear(128, 10)

``MNIST1DCNN`` (input ``(N, 1, 40)``), with one residual block (He et al., CVPR 2016)::

    Conv1d k5 (32 ch) -> BN -> ReLU -> Conv1d k3 s2 -> BN -> ReLU                 (length 20)
    -> ResidualBlock1d: ReLU(x + BN(Conv(ReLU(BN(Conv(x))))))
    -> Conv1d k3 s2 (64 ch) -> BN -> ReLU -> Conv1d k3 s2 -> BN -> ReLU           (length 5)
    -> Flatten (64*5) -> Linear(320, 10)
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "MNIST1DCNN", "ResidualBlock1d", "conv_bn_relu"]


def conv_bn_relu(dims: int, cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """``Conv{dims}d(cin, cout, kernel, stride, padding=kernel//2, bias=False) -> BN -> ReLU``."""
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    bn = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    return nn.Sequential(conv(cin, cout, kernel, stride, kernel // 2, bias=False), bn(cout), nn.ReLU())


class ResidualBlock1d(nn.Module):
    """``relu2(x + bn2(conv2(relu1(bn1(conv1(x))))))``: same channels and length in and out."""

    def __init__(self, channels: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, kernel, 1, kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv1d(channels, channels, kernel, 1, kernel // 2, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


class DigitsCNN(nn.Module):
    """Small 2-D CNN for the 8x8 ``digits`` images (8,474 parameters at the default width)."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(2, 1, width, 3),
            conv_bn_relu(2, width, width, 3),
            nn.MaxPool2d(2),
            conv_bn_relu(2, width, 2 * width, 3),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MNIST1DCNN(nn.Module):
    """1-D CNN with one residual block for MNIST-1D (31,530 parameters at the default width)."""

    def __init__(self, width: int = 32, num_classes: int = 10, length: int = 40) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 1, width, 5),
            conv_bn_relu(1, width, width, 3, stride=2),
            ResidualBlock1d(width, 3),
            conv_bn_relu(1, width, 2 * width, 3, stride=2),
            conv_bn_relu(1, 2 * width, 2 * width, 3, stride=2),
            nn.Flatten(),
        )
        out_len = length
        for _ in range(3):
            out_len = (out_len - 1) // 2 + 1
        self.classifier = nn.Linear(2 * width * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
