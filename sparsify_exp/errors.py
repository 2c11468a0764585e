"""The library's configuration error: which key, the value, and what is allowed."""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigValueError"]


class ConfigValueError(ValueError):
    """A bad value for a config key, e.g. ``sparsity_level=1.5: must be in [0, 1]``.

    ``key``, ``value`` and ``reason`` let a caller (the runner's validation) report the problem
    under its own name for the key (``sparsifier.sparsity_level``) without parsing messages;
    ``name`` is the data name when the value came from a per-name config.
    """

    def __init__(self, key: str, value: Any, reason: str, *, name: str | None = None) -> None:
        self.key, self.value, self.reason, self.name = key, value, reason, name
        where = f"data {name!r}: " if name is not None else ""
        super().__init__(f"{where}{key}={value!r}: {reason}")

    def for_name(self, name: str) -> ConfigValueError:
        """The same problem, said of data ``name``."""
        return ConfigValueError(self.key, self.value, self.reason, name=name)
