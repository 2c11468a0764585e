"""Training between sparsifier steps: the ``train`` config group's contract.

With ``train.fn`` set, the runner's loop is ``sparsifier.step(); scheduler.step();
train.fn(ctx)`` for each schedule step, so a schedule prunes a little, lets the model recover,
and prunes more (Zhu & Gupta 2017). ``train.fn`` is any callable taking a
:class:`TrainContext` (a ``_partial_: true`` node binds its own arguments)::

    def finetune(ctx: TrainContext, lr: float = 1e-3) -> dict[str, float]:
        opt = torch.optim.Adam(ctx.model.parameters(), lr=lr)  # a new one each call is fine
        for _ in range(ctx.steps):
            ...  # forward, loss, backward, opt.step()
        return {"loss": float(loss)}  # logged as train/loss at this schedule step

While it trains, pruned entries stay pruned: each model parameter the sparsifier holds is
parametrized as ``weight * mask`` (:class:`MaskedForward`), so the forward pass sees the masked
weights and pruned entries get no gradient, and after each call the weights are re-masked in
place (:func:`remask`), so whatever the optimizer moved (momentum, weight decay) is zero again,
the next step scores pruned blocks as zero, and the squash writes exactly the mask's zeros.
(``fidelity`` then compares each step's weights with their masked selves: with training, judge
the masks with a task evaluator.) Without a model (tensors, a checkpoint), a training callable
reads the masked data with ``ctx.sparsifier.get_data(name, return_original=False)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsify_exp.sparsifier import BaseDataSparsifier

__all__ = ["MaskedForward", "TrainContext", "TrainFn", "remask"]


@dataclass
class TrainContext:
    """What a training callable gets at each schedule step."""

    model: nn.Module | None
    """The data source's model (``data=model``, ``data=digits_mlp``), masked in its forward."""
    named_data: Mapping[str, Any]
    """The data given to the sparsifier, by name."""
    sparsifier: BaseDataSparsifier
    step: int
    """The schedule step just taken (0-based)."""
    steps: int
    """``train.steps_per_step``: optimizer steps (or epochs: the callable's choice) to run."""
    log: Callable[[Mapping[str, float]], None] = field(default=lambda metrics: None)
    """Logs the callable's own metrics at this step, under ``train/`` (batched)."""


class TrainFn(Protocol):
    def __call__(self, ctx: TrainContext) -> Mapping[str, float] | None:
        """Trains in place; returns metrics to log under ``train/`` (e.g. ``{"loss": 0.1}``)."""


class _Mask(nn.Module):
    """``weight * mask``; the mask is the sparsifier's own, so each step's update shows."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


class MaskedForward:
    """Parametrizes each of ``model``'s parameters that the sparsifier holds as ``W * mask``
    for the duration of a ``with`` block; on exit the plain parameters (the same tensors the
    sparsifier holds) are put back, unmasked, for the squash."""

    def __init__(self, model: nn.Module | None, sparsifier: BaseDataSparsifier) -> None:
        self.model, self.sparsifier = model, sparsifier
        self._registered: list[tuple[nn.Module, str]] = []

    def __enter__(self) -> MaskedForward:
        if self.model is None:
            return self
        params = dict(self.model.named_parameters())
        for name in self.sparsifier.data_groups:
            if name not in params:
                continue
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            mask = self.sparsifier.get_mask(name).as_subclass(torch.Tensor)
            parametrize.register_parametrization(module, attr, _Mask(mask.view(params[name].shape)))
            self._registered.append((module, attr))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, attr in reversed(self._registered):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        self._registered.clear()


@torch.no_grad()
def remask(sparsifier: BaseDataSparsifier) -> None:
    """Multiplies every mask into its data in place (the data stays registered)."""
    for name in sparsifier.data_groups:
        data = sparsifier.get_data(name, return_original=True)
        data.mul_(sparsifier.get_mask(name).as_subclass(torch.Tensor).view(data.shape))
