"""The ``method`` config group: named sparsifier presets (``conf/method/<name>.yaml``) whose
level is always ``sparsifier.sparsity_level``, so different methods sweep as one grid.

A preset is a ``# @package _global_`` file whose defaults list overrides ``/sparsifier`` and
whose body sets that sparsifier's own keys (block shape, zeros per block). A
calibration-aware method (Wanda, usage-based rows) is one more such file: its sparsifier, and
the calibration node it needs. This module holds what the runner says about methods before
Hydra composes anything: a method and a sparsifier chosen together, and a swept key that only
some of the swept methods have (Hydra would raise "Could not override" once a job).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

GROUP = "method"
NO_METHOD = "none"

_COULD_NOT_OVERRIDE = re.compile(r"Could not override '([^']+)'")


def _choice(overrides: Iterable[str], group: str) -> str | None:
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key.lstrip("+") == group:
            return value
    return None


def method_of(overrides: Sequence[str], default_sparsifier: str = "data_norm") -> str:
    """What a job's name for its method is: ``method=...``, else ``sparsifier=...``."""
    method = _choice(overrides, GROUP)
    if method and method != NO_METHOD:
        return method
    return _choice(overrides, "sparsifier") or default_sparsifier


def conflicting_choice(overrides: Sequence[str]) -> str | None:
    """One line when the command line chooses both a method and a sparsifier (the sparsifier
    would silently win over the method's own)."""
    method, sparsifier = _choice(overrides, GROUP), _choice(overrides, "sparsifier")
    if method and method != NO_METHOD and sparsifier:
        return (
            f"method={method} sparsifier={sparsifier}: a method chooses its own sparsifier; "
            "give one of the two"
        )
    return None


def missing_key(error: BaseException) -> str | None:
    """The key of Hydra's "Could not override 'KEY'" (a key the composed config lacks)."""
    found = _COULD_NOT_OVERRIDE.search(str(error))
    return found.group(1) if found else None


def missing_key_lines(lacking: dict[str, list[str]], having: dict[str, list[str]]) -> list[str]:
    """One line a key: ``sparsifier.sparse_block_shape: magnitude, row_norm have no such key
    (data_norm_1x4 has it)``; ``lacking`` / ``having`` map the key to methods."""
    lines = []
    for key, methods in lacking.items():
        without = ", ".join(dict.fromkeys(methods))
        with_it = ", ".join(m for m in dict.fromkeys(having.get(key, [])) if m not in methods)
        line = f"{key}: {without} {'has' if ',' not in without else 'have'} no such key"
        if with_it:
            line += f" (only {with_it} {'has' if ',' not in with_it else 'have'} it): sweep it "
            line += "in a separate sweep of those methods"
        else:
            line += "; check the spelling (python -m sparsify_exp --cfg job shows the keys)"
        lines.append(line)
    return lines
