"""Lightning callbacks that sparsify a copy of the model being trained.

* :class:`PostTrainingDataSparsity`: once, when ``Trainer.fit`` ends.
* :class:`TrainingAwareDataSparsity`: at the end of every training epoch, at the level a data
  scheduler sets for that epoch.

Both take the constructor arguments of torch's callbacks
(``torch.ao.pruning._experimental.data_sparsifier.lightning``) and work with any of this
library's sparsifiers and schedulers. The user's module is never changed: the sparsified
copy is at ``callback.sparsified``. Differences from torch's callbacks, all fixes:

* parameters keep their real dotted names (``encoder.0.weight``); torch replaced dots
  with ``_``, so ``a_b.weight`` and ``a.b_weight`` collided;
* by default only the weights of ``nn.Linear``, ``nn.Embedding`` and ``nn.EmbeddingBag``
  are sparsified (torch took every parameter, biases and norm scales too);
  ``module_types=None`` restores torch's choice. A tied weight is added once;
* a model without ``.model`` is sparsified whole (torch needed ``pl_module.model``);
* the sparsity reached (overall and per parameter) goes to the trainer's loggers, e.g. an
  ``MLFlowLogger``'s run, and is kept in ``callback.sparsity``;
* training-aware: ``.sparsified`` is squashed (sparse) after every epoch, not only when
  training ends, and a run resumed from a checkpoint continues the schedule;
* bad arguments or a model with nothing to sparsify fail before training, not after it.

This module imports Lightning; ``import sparsify_exp`` does not import this module.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sparsify_exp.lightning needs Lightning: pip install 'sparsify-exp[lightning]'"
    ) from error

from sparsify_exp.scheduler.base import BaseDataScheduler
from sparsify_exp.sparsifier.base import BaseDataSparsifier

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "PostTrainingDataSparsity",
    "TrainingAwareDataSparsity",
    "sparsifiable_parameters",
]

#: Modules whose ``weight`` is sparsified by default: the layers data sparsity is meant for.
DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.EmbeddingBag)

ModuleTypes = tuple[type[nn.Module], ...] | None


def sparsifiable_parameters(
    model: nn.Module, module_types: ModuleTypes = DEFAULT_MODULE_TYPES
) -> dict[str, torch.Tensor]:
    """``{dotted name: parameter}`` the callbacks sparsify in ``model``.

    The ``weight`` of every module that is an instance of one of ``module_types``, or, with
    ``module_types=None``, every parameter (torch's callbacks' choice). A parameter shared
    by several modules (tied weights) appears once, under its first name, so its mask is
    computed and counted once. A parametrized weight is skipped: its ``weight`` is computed
    on every access, so a mask on it would not reach the module.
    """
    selected: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    if module_types is None:
        candidates: Iterable[tuple[str, torch.Tensor]] = model.named_parameters()
    else:
        candidates = (
            (f"{prefix}.weight" if prefix else "weight", weight)
            for prefix, module in model.named_modules()
            if isinstance(module, module_types)
            for weight in [dict(module.named_parameters(recurse=False)).get("weight")]
            if weight is not None
        )
    for name, parameter in candidates:
        if id(parameter) not in seen:
            seen.add(id(parameter))
            selected[name] = parameter
    return selected


def _model_of(pl_module: pl.LightningModule) -> nn.Module:
    """``pl_module.model`` when it is a module (torch's convention), else ``pl_module``."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def _check_class(label: str, cls: Any, base: type) -> None:
    if not isinstance(cls, type):
        raise TypeError(
            f"{label} must be a class (the callback builds the object when training starts); "
            f"got an instance of {type(cls).__name__}"
        )
    if not issubclass(cls, base):
        raise TypeError(
            f"{label} must be a subclass of sparsify_exp.{base.__name__}; got {cls.__module__}."
            f"{cls.__qualname__} (torch's classes take the same arguments: import them from "
            "sparsify_exp instead)"
        )


def _selection(
    model: nn.Module, module_types: ModuleTypes, pl_module: pl.LightningModule
) -> dict[str, torch.Tensor]:
    params = sparsifiable_parameters(model, module_types)
    if not params:
        kinds = (
            "parameters"
            if module_types is None
            else "weights of " + ", ".join(t.__name__ for t in module_types)
        )
        raise ValueError(
            f"nothing to sparsify in {type(pl_module).__name__}: its model has no {kinds}; "
            "pass module_types=... (None for every parameter)"
        )
    return params


def _attach(
    model: nn.Module, sparsifier: BaseDataSparsifier, module_types: ModuleTypes, pl_module: Any
) -> list[str]:
    """Adds the selected parameters of ``model`` under their names, reusing existing masks."""
    params = _selection(model, module_types, pl_module)
    with warnings.catch_warnings():
        # re-adding a name each epoch is the point here, not a mistake
        warnings.filterwarnings("ignore", message="Replacing existing data", category=UserWarning)
        for name, parameter in params.items():
            sparsifier.add_data(name, parameter)
    return list(params)


def _sparsity(
    sparsifier: BaseDataSparsifier, names: Iterable[str], prefix: str
) -> dict[str, float]:
    """``{prefix/overall, prefix/<name>}``: the fraction of entries each mask removes."""
    metrics: dict[str, float] = {}
    zeros_total = numel_total = 0
    for name in names:
        mask = sparsifier.get_mask(name)
        zeros, numel = int((mask == 0).sum()), mask.numel()
        zeros_total += zeros
        numel_total += numel
        metrics[f"{prefix}/{name}"] = zeros / numel if numel else 0.0
    return {f"{prefix}/overall": zeros_total / numel_total if numel_total else 0.0, **metrics}


class _DataSparsityCallback(pl.Callback):
    """What both callbacks share: the sparsifier's class and args, and what to sparsify."""

    def __init__(
        self,
        data_sparsifier_class: type[BaseDataSparsifier],
        data_sparsifier_args: Mapping[str, Any],
        *,
        module_types: ModuleTypes = DEFAULT_MODULE_TYPES,
        log_prefix: str | None = "sparsity",
    ) -> None:
        super().__init__()
        _check_class("data_sparsifier_class", data_sparsifier_class, BaseDataSparsifier)
        self.data_sparsifier_class = data_sparsifier_class
        self.data_sparsifier_args = dict(data_sparsifier_args)
        self.module_types = None if module_types is None else tuple(module_types)
        self.log_prefix = log_prefix
        self.data_sparsifier: BaseDataSparsifier | None = None
        self.sparsified: nn.Module | None = None
        #: the last sparsity reached: ``{"<prefix>/overall": f, "<prefix>/<name>": f, ...}``
        self.sparsity: dict[str, float] = {}

    def _new_sparsifier(self) -> BaseDataSparsifier:
        return self.data_sparsifier_class(**self.data_sparsifier_args)

    def _measure(self, sparsifier: BaseDataSparsifier, names: list[str]) -> dict[str, float]:
        self.sparsity = _sparsity(sparsifier, names, self.log_prefix or "sparsity")
        return self.sparsity

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # fail now, not after a whole training run: bad sparsifier args, nothing to sparsify
        self._new_sparsifier()
        _selection(_model_of(pl_module), self.module_types, pl_module)


class PostTrainingDataSparsity(_DataSparsityCallback):
    """Sparsifies a copy of the trained model once ``Trainer.fit`` ends.

    At ``on_fit_end`` the model (``pl_module.model``, or the whole module without one) is
    deep-copied and put in eval mode, its weights are added to a new
    ``data_sparsifier_class(**data_sparsifier_args)`` under their dotted names, and the
    sparsifier steps once and squashes: ``.sparsified`` is the sparse copy,
    ``.data_sparsifier`` holds its masks. The trained module is left as it was.

    Args:
        data_sparsifier_class: a :class:`~sparsify_exp.BaseDataSparsifier` subclass, e.g.
            :class:`~sparsify_exp.DataNormSparsifier`; the class, not an instance.
        data_sparsifier_args: its constructor's keyword arguments (no ``data_list``).
        module_types: whose ``weight`` to sparsify; ``None``: every parameter.
        log_prefix: metric names are ``<log_prefix>/overall`` and ``<log_prefix>/<name>``;
            ``None`` logs nothing (``.sparsity`` is still filled).

    The metrics go to every logger of the trainer at the last ``global_step`` (``on_fit_end``
    comes after Lightning has closed its loggers, so ``self.log`` is not allowed there; the
    loggers are saved and closed again after).
    """

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = copy.deepcopy(_model_of(pl_module)).eval()
        sparsifier = self._new_sparsifier()
        names = _attach(model, sparsifier, self.module_types, pl_module)
        sparsifier.step()
        metrics = self._measure(sparsifier, names)
        sparsifier.squash_mask()
        self.sparsified, self.data_sparsifier = model, sparsifier
        if self.log_prefix is not None and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()
                logger.finalize("success")


class TrainingAwareDataSparsity(_DataSparsityCallback):
    """Sparsifies a copy of the model at the end of every training epoch, on a schedule.

    * ``on_train_start``: builds ``data_sparsifier_class(**data_sparsifier_args)`` on a copy
      of the model, then ``data_scheduler_class(data_sparsifier=..., **data_scheduler_args)``.
      Unless ``data_scheduler_args`` sets ``last_epoch``, a run resumed from a checkpoint
      starts the schedule at the resumed epoch, not at 0.
    * ``on_train_epoch_end``: deep-copies the model as trained so far, re-adds its weights
      (the previous masks are reused, as in torch, so a sparsifier that only adds zeros keeps
      them), steps the sparsifier at this epoch's level, then the scheduler, and squashes:
      ``.sparsified`` is this epoch's sparse copy. The sparsity reached is logged with
      ``pl_module.log`` (per epoch, to every logger, and into ``trainer.callback_metrics``).

    Args:
        data_sparsifier_class, data_sparsifier_args, module_types, log_prefix: as for
            :class:`PostTrainingDataSparsity`.
        data_scheduler_class: a :class:`~sparsify_exp.BaseDataScheduler` subclass, e.g.
            :class:`~sparsify_exp.CubicScheduler`; the class, not an instance.
        data_scheduler_args: its constructor's keyword arguments but ``data_sparsifier``.

    The user's module is trained densely and never masked: this shows what sparsifying at
    each point of training would give (e.g. to pick when to stop), it does not train a sparse
    model.
    """

    def __init__(
        self,
        data_sparsifier_class: type[BaseDataSparsifier],
        data_sparsifier_args: Mapping[str, Any],
        data_scheduler_class: type[BaseDataScheduler],
        data_scheduler_args: Mapping[str, Any],
        *,
        module_types: ModuleTypes = DEFAULT_MODULE_TYPES,
        log_prefix: str | None = "sparsity",
    ) -> None:
        super().__init__(
            data_sparsifier_class,
            data_sparsifier_args,
            module_types=module_types,
            log_prefix=log_prefix,
        )
        _check_class("data_scheduler_class", data_scheduler_class, BaseDataScheduler)
        if "data_sparsifier" in data_scheduler_args:
            raise ValueError(
                "data_scheduler_args must not hold 'data_sparsifier': the callback builds "
                "the sparsifier and passes it"
            )
        self.data_scheduler_class = data_scheduler_class
        self.data_scheduler_args = dict(data_scheduler_args)
        self.data_scheduler: BaseDataScheduler | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sparsifier = self._new_sparsifier()
        # the scheduler reads every name's configured value when it is built
        _attach(copy.deepcopy(_model_of(pl_module)), sparsifier, self.module_types, pl_module)
        args = copy.deepcopy(self.data_scheduler_args)
        args.setdefault("last_epoch", trainer.current_epoch - 1)
        self.data_scheduler = self.data_scheduler_class(data_sparsifier=sparsifier, **args)
        self.data_sparsifier = sparsifier
        self.sparsified = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sparsifier, scheduler = self.data_sparsifier, self.data_scheduler
        if sparsifier is None or scheduler is None:  # on_train_start did not run
            return
        model = copy.deepcopy(_model_of(pl_module)).eval()
        names = _attach(model, sparsifier, self.module_types, pl_module)
        sparsifier.step()
        metrics = self._measure(sparsifier, names)
        scheduler.step()
        sparsifier.squash_mask()
        self.sparsified = model
        if self.log_prefix is not None:
            # logger=False without loggers: Lightning warns once per metric name otherwise
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, logger=bool(trainer.loggers))
