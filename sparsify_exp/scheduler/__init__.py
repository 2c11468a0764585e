"""Schedules for a data sparsifier's config (e.g. ramping ``sparsity_level``)."""

from sparsify_exp.scheduler.base import BaseDataScheduler
from sparsify_exp.scheduler.schedules import (
    ConstantScheduler,
    CubicScheduler,
    LinearScheduler,
    StepScheduler,
)

__all__ = [
    "BaseDataScheduler",
    "ConstantScheduler",
    "CubicScheduler",
    "LinearScheduler",
    "StepScheduler",
]
