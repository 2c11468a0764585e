"""BaseDataScheduler: varies one config key of a data sparsifier over steps.

Same API as ``torch.ao.pruning._experimental.data_scheduler.BaseDataScheduler``: the
constructor takes step 0, and a loop calls ``sparsifier.step()`` then ``scheduler.step()``.
"""

from __future__ import annotations

import abc
import warnings
import weakref
from functools import wraps
from typing import Any

from sparsify_exp.sparsifier.base import BaseDataSparsifier

__all__ = ["BaseDataScheduler"]


def _counting(method: Any) -> Any:
    """Wraps a bound ``step`` so that calls are counted on its sparsifier."""
    if getattr(method, "_with_counter", False):
        return method
    instance_ref = weakref.ref(method.__self__)
    func = method.__func__
    del method

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        instance = instance_ref()
        instance._step_count += 1
        return func(instance, *args, **kwargs)

    wrapper._with_counter = True  # type: ignore[attr-defined]
    return wrapper


class BaseDataScheduler(abc.ABC):
    r"""Sets ``sparsifier.data_groups[name][schedule_param]`` for every name at each step.

    Args:
        data_sparsifier: the sparsifier whose config is scheduled.
        schedule_param: the config key to vary, e.g. ``"sparsity_level"``.
        last_epoch: the epoch to resume from (``-1`` starts fresh).
        verbose: print every change.

    Subclasses implement :meth:`get_schedule_param`, returning ``{name: value}``;
    ``self.base_param[name]`` is each name's configured value when the scheduler was built.
    """

    def __init__(
        self,
        data_sparsifier: BaseDataSparsifier,
        schedule_param: str,
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        if not isinstance(data_sparsifier, BaseDataSparsifier) and not _is_torch_reference(
            data_sparsifier
        ):
            raise TypeError(
                f"{type(data_sparsifier).__name__} is not a BaseDataSparsifier; a data "
                "scheduler drives a data sparsifier"
            )
        if not isinstance(schedule_param, str) or not schedule_param:
            raise ValueError(f"schedule_param must be a config key; got {schedule_param!r}")
        self.data_sparsifier = data_sparsifier
        self.schedule_param = schedule_param
        self.base_param: dict[str, Any] = {
            name: config.get(schedule_param) for name, config in data_sparsifier.data_groups.items()
        }
        self.last_epoch = last_epoch
        data_sparsifier.step = _counting(data_sparsifier.step)  # type: ignore[method-assign]
        data_sparsifier._step_count = 0  # type: ignore[attr-defined]
        self._step_count = 0
        self.verbose = verbose
        self._get_sp_called_within_step = False
        self.step()

    @abc.abstractmethod
    def get_schedule_param(self) -> dict[str, Any]:
        """``{name: value}`` for epoch ``self.last_epoch``."""

    def get_last_param(self) -> dict[str, Any]:
        return self._last_param

    def step(self) -> None:
        if self._step_count == 1:
            if not hasattr(self.data_sparsifier.step, "_with_counter"):
                warnings.warn(
                    "Seems like `data_sparsifier.step()` has been overridden after sparsity "
                    "scheduler initialization. Please, make sure to call "
                    "`data_sparsifier.step()` before `scheduler.step()`.",
                    UserWarning,
                    stacklevel=2,
                )
            elif self.data_sparsifier._step_count < 1:  # type: ignore[attr-defined]
                warnings.warn(
                    "Detected call of `scheduler.step()` before `data_sparsifier.step()`. "
                    "You have to make sure you run the data_sparsifier.step() BEFORE any "
                    "calls to the scheduler.step().",
                    UserWarning,
                    stacklevel=2,
                )
        self._step_count += 1
        self._get_sp_called_within_step = True
        try:
            self.last_epoch += 1
            updated = self.get_schedule_param()
        finally:
            self._get_sp_called_within_step = False
        groups = self.data_sparsifier.data_groups
        for name, value in updated.items():
            groups[name][self.schedule_param] = value
            if self.verbose:
                print(f"Adjusting {self.schedule_param} for group {name} to {value}")
        self._last_param = {
            name: config.get(self.schedule_param, None) for name, config in groups.items()
        }
        self.data_sparsifier.enable_mask_update = True

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the sparsifier (save the sparsifier's own state_dict too)."""
        return {key: value for key, value in self.__dict__.items() if key != "data_sparsifier"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the attributes; load the sparsifier's state first."""
        self.__dict__.update(state_dict)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__} (\nData Sparsifier {self.data_sparsifier}\n"
            f"    {self.schedule_param}: {self.base_param}\n)"
        )


def _is_torch_reference(obj: Any) -> bool:
    """Also drive torch's own data sparsifier, so schedules work with either."""
    try:
        from torch.ao.pruning._experimental.data_sparsifier import (
            BaseDataSparsifier as TorchBaseDataSparsifier,
        )
    except ImportError:
        return False
    return isinstance(obj, TorchBaseDataSparsifier)
