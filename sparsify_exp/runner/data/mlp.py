"""The default model for ``data=model``: a small multi-layer perceptron."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn


class MLP(nn.Module):
    """``sizes=[in, hidden..., out]``: Linear layers with ReLU between them.

    Parameters are named ``net.<i>.weight`` / ``net.<i>.bias`` (names with dots).
    """

    def __init__(self, sizes: Sequence[int] = (784, 256, 128, 10)):
        super().__init__()
        sizes = [int(s) for s in sizes]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
