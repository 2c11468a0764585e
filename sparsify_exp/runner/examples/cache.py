"""Train a worked example's model once per machine: its ``state_dict`` is cached in the temp
dir under a key of every argument, so a sweep of many jobs trains once."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def load_or_train(
    module: nn.Module,
    name: str,
    key: str,
    train: Callable[[], None],
    cache: bool = True,
    cache_dir: str | None = None,
) -> None:
    """Loads ``module``'s cached weights for ``key``, or calls ``train()`` and caches them;
    leaves the module in eval mode."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    root = Path(cache_dir or Path(tempfile.gettempdir()) / "sparsify_exp_cache")
    path = root / f"{name}_{digest}.pt"
    if cache and path.is_file():
        try:
            module.load_state_dict(torch.load(path, weights_only=True))
            module.eval()
            return
        except Exception:  # a corrupt or foreign file: retrain and overwrite it
            pass
    train()
    if cache:
        root.mkdir(parents=True, exist_ok=True)
        # write then rename: parallel jobs never read a half-written file
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".tmp")
        os.close(fd)
        torch.save(module.state_dict(), tmp)
        os.replace(tmp, path)
    module.eval()
