"""The contract between the runner and quality evaluators.

The runner calls three hooks on every configured evaluator, in order:

1. ``on_start``  -- before the first ``step()``: the data is still dense.
2. ``on_masked`` -- after the last ``step()``, before ``squash_mask()``: the originals and
   the masks are both available (``sparsifier.get_data(name)``, ``sparsifier.get_mask(name)``).
3. ``on_end``    -- after ``squash_mask()``: the user's own tensors/modules hold sparse values.

An evaluator with ``wants_dense = True`` finds in ``ctx.dense`` (:class:`DenseReference`) a
copy of the model or data taken before the first step, in every hook. One that only compares
outputs can instead keep what it measured in ``on_start`` (no model copy).

With ``eval.every=N``, ``on_step`` also runs after every N-th schedule step (not the last,
which ``on_masked`` and ``on_end`` cover), with the masks of that step; by default it is
``on_masked``. Its metrics share the keys and the step axis of the others.

Each hook returns flat metrics (``{"fidelity/rel_error": 0.12}``); the runner logs them to
the job's MLflow run. Keys start with the evaluator's ``name`` so a sweep report can find them.
Per-name values go through :meth:`Evaluator.per_name_metrics`: every name lands in the run's
``per_name.csv`` (column ``<evaluator>/<metric>``), and the first ``ctx.max_names`` names also
become MLflow keys ``<evaluator>/<metric>/<name>``. :meth:`Evaluator.summary` picks the
headline numbers the run also logs under ``_summary/`` (see docs/runner.md, "Metrics").
Files an evaluator writes under ``ctx.artifacts_dir`` are logged as run artifacts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify_exp.runner.evaluation._util import metric_key
from sparsify_exp.runner.tracking.keys import per_name_key
from sparsify_exp.sparsifier import BaseDataSparsifier

Metrics = dict[str, float]


@dataclass
class EvalContext:
    """What an evaluator may look at."""

    named_data: Mapping[str, torch.Tensor | nn.Module]
    """The user's objects exactly as added to the sparsifier (tensors, parameters, embeddings)."""
    sparsifier: BaseDataSparsifier
    model: nn.Module | None = None
    """The module the data came from, when the data source built or loaded one."""
    artifacts_dir: Path = field(default_factory=lambda: Path("."))
    extras: dict[str, Any] = field(default_factory=dict)
    max_names: int = 20
    """Per-name MLflow keys for at most this many names (the runner's
    ``mlflow.max_name_metrics``, one cap for every per-name family)."""
    per_name: dict[str, dict[str, float]] = field(default_factory=dict)
    """``name -> {column: value}``: what the evaluators measured per name, for ``per_name.csv``."""
    tokenizer: Any = None
    """The model's tokenizer when the data source has one (``data=hf``)."""
    dense: DenseReference | None = None
    """The data as it was before the first step, for evaluators that set ``wants_dense``."""


@dataclass
class DenseReference:
    """A copy of the model (or of the named data) taken before the first step: what a hook
    compares the sparsified data with, without the evaluator caching it."""

    model: nn.Module | None
    named_data: Mapping[str, torch.Tensor | nn.Module]

    @classmethod
    def capture(
        cls, model: nn.Module | None, named_data: Mapping[str, torch.Tensor | nn.Module]
    ) -> DenseReference:
        """Deep copies: of the model (the named data then refer into the copy), or of each
        named datum."""
        import copy

        if model is None:
            return cls(None, {n: copy.deepcopy(obj) for n, obj in named_data.items()})
        dense = copy.deepcopy(model)
        params = dict(dense.named_parameters(remove_duplicate=False))
        return cls(dense, {n: params.get(n, obj) for n, obj in named_data.items()})


class Evaluator:
    """Base class: override any of the hooks; each returns metrics to log."""

    name: str = "evaluator"
    headline: tuple[str, ...] = ()
    """Metrics (without the ``<name>/`` prefix) a user compares across runs: logged again as
    ``_summary/<name>_<metric>``."""
    max_names: int | None = None
    """Per-name MLflow keys for at most this many names; None: ``ctx.max_names``."""
    wants_dense: bool = False
    """True: the runner copies the data before the first step into ``ctx.dense`` (memory:
    one more copy of the model), so every hook can compare with it."""

    def summary(self, metrics: Mapping[str, float]) -> Metrics:
        """``{short name: value}`` of the headline metrics among ``metrics``."""
        out: Metrics = {}
        for key in self.headline:
            value = metrics.get(f"{self.name}/{key}")
            if value is not None:
                out[f"{self.name}_{key}".replace("/", "_")] = value
        return out

    def per_name_metrics(
        self, ctx: EvalContext, metric: str, values: Mapping[str, float]
    ) -> Metrics:
        """Records ``values`` (``name -> value``) as column ``<evaluator>/<metric>`` of the
        per-name table, and returns the MLflow keys of the first names under the cap."""
        column = f"{self.name}/{metric}"
        for name, value in values.items():
            ctx.per_name.setdefault(name, {})[column] = float(value)
        cap = ctx.max_names if self.max_names is None else self.max_names
        return {
            per_name_key(metric_key(self.name, metric), name): float(value)
            for name, value in list(values.items())[:cap]
        }

    def on_start(self, ctx: EvalContext) -> Metrics:
        return {}

    def on_masked(self, ctx: EvalContext) -> Metrics:
        return {}

    def on_end(self, ctx: EvalContext) -> Metrics:
        return {}

    def on_step(self, ctx: EvalContext) -> Metrics:
        return self.on_masked(ctx)
