"""Config checks the sparsifiers share; each raises a ConfigValueError naming its key."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sparsify_exp.errors import ConfigValueError

NORMS = ("L1", "L2")


def check_level(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigValueError("sparsity_level", value, "must be a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ConfigValueError("sparsity_level", value, "must be in [0, 1]")
    return float(value)


def check_norm(value: Any) -> str:
    if value not in NORMS:
        raise ConfigValueError("norm", value, f"must be one of: {', '.join(NORMS)}")
    return value


def checked_config(
    name: str, config: dict[str, Any], checks: dict[str, Callable[[Any], Any]]
) -> dict[str, Any]:
    """``config`` with each key in ``checks`` checked (and normalised); a bad value is said
    of data ``name``."""
    try:
        for key, check in checks.items():
            config[key] = check(config.get(key))
    except ConfigValueError as error:
        raise error.for_name(name) from None
    return config
