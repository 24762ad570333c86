"""A small real model for the demo: a CNN trained in seconds on scikit-learn's digits."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv-bn-relu x3 (one strided), global mean, linear: 8x8 grey digits -> 10 classes."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean([2, 3]))


def load_digits_split(seed: int = 0):
    """(train_x, train_y, test_x, test_y): 1797 real 8x8 digits, standardised, 75/25 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = len(x) * 3 // 4
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def train_digits(epochs: int = 8, seed: int = 0) -> tuple[nn.Module, tuple]:
    """Trains DigitsCNN (a few seconds on one core); returns (model in eval mode, split)."""
    torch.manual_seed(seed)
    split = load_digits_split(seed)
    tx, ty = split[0], split[1]
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for i in torch.randperm(len(tx)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(tx[i]), ty[i]).backward()
            opt.step()
    return model.eval(), split


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())
