"""Calibration inputs for the runner tests: batches for data=model's MLP, a ``_target_``."""

from __future__ import annotations

import torch


def mlp_inputs(batches: int = 4, batch_size: int = 16, features: int = 32, seed: int = 7):
    """Inputs of data=model's MLP whose features differ in scale by 1000x."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, features)
    return [torch.randn(batch_size, features, generator=gen) * scale for _ in range(batches)]
