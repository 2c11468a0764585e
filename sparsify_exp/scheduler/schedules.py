"""Concrete schedules: constant, linear ramp, step decay/growth, and the cubic gradual
schedule of Zhu & Gupta (2017). Each takes per-name targets.

``target`` is a number for every name, a ``{name: number}`` dict (names it leaves out use
their configured value), or ``None``: each name's configured value (``data_groups[name]``),
so per-name configs given to ``add_data`` become per-name targets. (``StepScheduler`` is
the exception: like ``StepLR`` it starts from the configured value and has no target unless
given one.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sparsify_exp.errors import ConfigValueError
from sparsify_exp.scheduler.base import BaseDataScheduler
from sparsify_exp.sparsifier.base import BaseDataSparsifier

__all__ = ["ConstantScheduler", "CubicScheduler", "LinearScheduler", "StepScheduler"]

Target = float | Mapping[str, float] | None


def _check_number(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigValueError(label, value, "must be a number")
    return float(value)


def _check_count(label: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigValueError(label, value, f"must be an integer >= {minimum}")
    return value


def _check_target(target: Target) -> Target:
    if target is None:
        return None
    if isinstance(target, Mapping):
        return {name: _check_number(f"target[{name!r}]", v) for name, v in target.items()}
    return _check_number("target", target)


class _TargetScheduler(BaseDataScheduler):
    """Resolves each name's target and maps progress in [0, 1] to a value."""

    def __init__(
        self,
        data_sparsifier: BaseDataSparsifier,
        schedule_param: str = "sparsity_level",
        target: Target = None,
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        self.target = _check_target(target)
        super().__init__(data_sparsifier, schedule_param, last_epoch, verbose)

    def target_for(self, name: str) -> float:
        if isinstance(self.target, Mapping) and name in self.target:
            return self.target[name]
        if self.target is not None and not isinstance(self.target, Mapping):
            return self.target
        configured = self.base_param.get(name)
        if configured is None:
            configured = self.data_sparsifier.data_groups[name].get(self.schedule_param)
        if configured is None:
            raise ValueError(
                f"no target for {name!r}: its config has no {self.schedule_param!r}; pass "
                "target=<number> or target={name: number}"
            )
        return float(configured)

    def value(self, name: str, epoch: int) -> float:
        raise NotImplementedError

    def get_schedule_param(self) -> dict[str, float]:
        return {
            name: self.value(name, self.last_epoch) for name in self.data_sparsifier.data_groups
        }


class ConstantScheduler(_TargetScheduler):
    """Holds every name at its target from the first step on."""

    def value(self, name: str, epoch: int) -> float:
        return self.target_for(name)


class LinearScheduler(_TargetScheduler):
    r"""Ramps linearly from ``initial_value`` to the target.

    ``v_t = v_0 + (target - v_0) * clamp((t - start_step) / total_steps, 0, 1)``: the target
    is reached at epoch ``start_step + total_steps`` and held after.
    """

    def __init__(
        self,
        data_sparsifier: BaseDataSparsifier,
        schedule_param: str = "sparsity_level",
        total_steps: int = 10,
        initial_value: float = 0.0,
        target: Target = None,
        start_step: int = 0,
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        self.total_steps = _check_count("total_steps", total_steps, 0)
        self.initial_value = _check_number("initial_value", initial_value)
        self.start_step = _check_count("start_step", start_step, 0)
        super().__init__(data_sparsifier, schedule_param, target, last_epoch, verbose)

    def value(self, name: str, epoch: int) -> float:
        target = self.target_for(name)
        if self.total_steps == 0:
            progress = 1.0 if epoch >= self.start_step else 0.0
        else:
            progress = min(max((epoch - self.start_step) / self.total_steps, 0.0), 1.0)
        return self.initial_value + (target - self.initial_value) * progress


class StepScheduler(_TargetScheduler):
    r"""Multiplies by ``gamma`` every ``step_size`` epochs, like torch's ``StepLR``.

    ``v_t = v_0 * gamma**(t // step_size)``; ``initial_value=None`` starts from each name's
    configured value. A ``target`` (number or per-name dict) stops the value there (from
    below when ``gamma > 1``, from above when ``gamma < 1``). Without one there is no stop,
    except that a ``sparsity_level`` is kept in [0, 1].
    """

    def __init__(
        self,
        data_sparsifier: BaseDataSparsifier,
        schedule_param: str = "sparsity_level",
        step_size: int = 1,
        gamma: float = 2.0,
        initial_value: float | None = None,
        target: Target = None,
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        self.step_size = _check_count("step_size", step_size, 1)
        self.gamma = _check_number("gamma", gamma)
        if self.gamma <= 0:
            raise ConfigValueError("gamma", gamma, "must be > 0")
        self.initial_value = (
            None if initial_value is None else _check_number("initial_value", initial_value)
        )
        super().__init__(data_sparsifier, schedule_param, target, last_epoch, verbose)

    def value(self, name: str, epoch: int) -> float:
        start = self.initial_value
        if start is None:
            start = self.base_param.get(name)
            if start is None:
                start = self.data_sparsifier.data_groups[name].get(self.schedule_param)
            if start is None:
                raise ValueError(
                    f"no initial value for {name!r}: its config has no "
                    f"{self.schedule_param!r}; pass initial_value=<number>"
                )
        value = float(start) * self.gamma ** (max(epoch, 0) // self.step_size)
        if self.target is not None:
            target = self.target_for(name)
            value = min(value, target) if self.gamma >= 1 else max(value, target)
        elif self.schedule_param == "sparsity_level":
            value = min(max(value, 0.0), 1.0)
        return value


class CubicScheduler(_TargetScheduler):
    r"""The gradual schedule of Zhu & Gupta (2017), *To prune, or not to prune*.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt))**3`` for
    ``t_0 <= t <= t_0 + n * dt``, ``s_i`` before and ``s_f`` after, where ``s_i`` is
    ``initial_value``, ``s_f`` the target, ``t_0`` ``start_step``, ``n`` ``total_steps`` (the
    number of pruning steps) and ``dt`` ``step_interval``. The value changes only every ``dt``
    epochs: fast at first, while many redundant weights remain, then slower.
    """

    def __init__(
        self,
        data_sparsifier: BaseDataSparsifier,
        schedule_param: str = "sparsity_level",
        initial_value: float = 0.0,
        target: Target = None,
        start_step: int = 0,
        total_steps: int = 10,
        step_interval: int = 1,
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        self.initial_value = _check_number("initial_value", initial_value)
        self.start_step = _check_count("start_step", start_step, 0)
        self.total_steps = _check_count("total_steps", total_steps, 1)
        self.step_interval = _check_count("step_interval", step_interval, 1)
        super().__init__(data_sparsifier, schedule_param, target, last_epoch, verbose)

    def value(self, name: str, epoch: int) -> float:
        target = self.target_for(name)
        if epoch < self.start_step:
            return self.initial_value
        pruning_step = (epoch - self.start_step) // self.step_interval
        progress = min(pruning_step / self.total_steps, 1.0)
        return target + (self.initial_value - target) * (1.0 - progress) ** 3
