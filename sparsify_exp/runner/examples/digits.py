"""A small MLP on scikit-learn's bundled digits, for the ``task`` evaluator's worked example.

``DigitsMLP()`` trains itself in its constructor (full-batch Adam, about a second on a laptop
core), deterministically from ``seed``, and caches the trained ``state_dict`` in the temp dir
keyed by every argument, so a sweep of many jobs trains once. ``accuracy(model)`` scores it
on a held-out split the model never saw::

    python -m sparsify_exp -m data=digits_mlp eval=[fidelity,task] \\
        sparsifier=data_norm sparsifier.sparsity_level=0.1,0.5,0.9

needs ``scikit-learn`` (the ``examples`` extra).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn

from sparsify_exp.runner.examples.cache import load_or_train

__all__ = ["DigitsMLP", "accuracy", "finetune", "load_split"]

_CACHE_VERSION = 1


@lru_cache(maxsize=4)
def load_split(
    test_size: float = 0.25, split_seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: digits scaled to [0, 1], stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError(
            "the digits example needs scikit-learn: pip install 'sparsify-exp[examples]'"
        ) from e

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0,
        digits.target,
        test_size=test_size,
        random_state=split_seed,
        stratify=digits.target,
    )
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


class DigitsMLP(nn.Module):
    """64 → hidden → hidden → 10 ReLU MLP, trained on construction (or loaded from cache)."""

    def __init__(
        self,
        hidden: int = 64,
        seed: int = 0,
        epochs: int = 300,
        lr: float = 0.01,
        cache: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
        load_or_train(
            self,
            "digits_mlp",
            f"v{_CACHE_VERSION}-h{hidden}-s{seed}-e{epochs}-lr{lr}",
            lambda: self._train(seed=seed, epochs=epochs, lr=lr),
            cache,
            cache_dir,
        )

    def _train(self, seed: int, epochs: int, lr: float) -> None:
        x, y, _, _ = load_split()
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
            torch.manual_seed(seed)
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
            opt = torch.optim.Adam(self.parameters(), lr=lr)
            self.train()
            for _ in range(epochs):  # full batch: deterministic, no shuffling
                opt.zero_grad()
                loss = nn.functional.cross_entropy(self(x), y)
                loss.backward()
                opt.step()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@torch.no_grad()
def accuracy(model: nn.Module) -> dict[str, float]:
    """Held-out accuracy and loss of a digits classifier (the ``task`` evaluator's callable)."""
    _, _, x, y = load_split()
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    return {
        "accuracy": float((logits.argmax(dim=1) == y).float().mean()),
        "loss": float(nn.functional.cross_entropy(logits, y)),
    }


def finetune(ctx: Any, lr: float = 0.003) -> dict[str, float]:
    """``train=digits``: ``ctx.steps`` full-batch Adam steps on the training split, between
    sparsifier steps (the forward pass sees the masked weights). Returns the last loss."""
    if ctx.model is None:
        raise ValueError("train=digits fine-tunes a model: use data=digits_mlp")
    x, y, _, _ = load_split()
    model = ctx.model
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.zeros(())
    for _ in range(ctx.steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    return {"loss": float(loss.detach())}
