"""``scope``: one sparsity level per name (``"local"``) or one for all names (``"global"``).

A global step ranks the items of every name together (entries for magnitude, blocks for data
norm) and removes ``round(sparsity_level * total)`` of them under one threshold, so names lose
different fractions. It reads each name's data in chunks and never concatenates them: its
extra memory is a chunk, the candidates near the threshold and, for block scores, one name's
score grid at a time.

The hook is :class:`GlobalScopeMixin`: it overrides ``step()`` to find the threshold over all
names (:func:`~sparsify_exp.sparsifier.select.find_cuts`), then calls ``update_mask(name, data,
**config, global_cut=cut)`` for each name, so a subclass writes its mask from the cut exactly
as it writes a local one.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from sparsify_exp.errors import ConfigValueError
from sparsify_exp.sparsifier.select import KeySource, common_key_dtype, find_cuts

__all__ = ["SCOPES", "GlobalScopeMixin", "check_scope"]

SCOPES = ("local", "global")


def check_scope(value: Any, owner: str, has_global: bool) -> str:
    """``value`` if it is a scope ``owner`` supports; a :class:`ConfigValueError` otherwise."""
    if not isinstance(value, str) or value not in SCOPES:
        raise ConfigValueError("scope", value, f"must be one of: {', '.join(SCOPES)}")
    if value == "global" and not has_global:
        raise ConfigValueError(
            "scope",
            value,
            f"{owner} has no global form (its masks are defined per name); use scope=local, "
            "or MagnitudeSparsifier / DataNormSparsifier for one level across names",
        )
    return value


class GlobalScopeMixin:
    """``step()`` with ``self.scope == "global"``: one threshold over every name not squashed.

    Every such name must have the same ``sparsity_level`` (the level of the whole); a
    scheduler that sets one value for all names keeps that true. Ties at the threshold are
    removed in the order names were added, then by position.
    """

    scope: str

    @abc.abstractmethod
    def _global_keys(
        self, name: str, data: torch.Tensor, config: dict[str, Any], key_dtype: torch.dtype
    ) -> KeySource:
        """The keys of ``data``'s ranked items, for a global step."""

    def step(self) -> None:
        if self.scope != "global":
            super().step()  # type: ignore[misc]
            return
        if not self.enable_mask_update:  # type: ignore[attr-defined]
            return
        with torch.no_grad():
            live = [
                (name, self.get_data(name), config)  # type: ignore[attr-defined]
                for name, config in self.data_groups.items()  # type: ignore[attr-defined]
                if not self.is_squashed(name)  # type: ignore[attr-defined]
            ]
            if not live:
                return
            level = _common_level(live)
            key_dtype = common_key_dtype([data.dtype for _, data, _ in live])
            sources = [
                self._global_keys(name, data, config, key_dtype) for name, data, config in live
            ]
            total = sum(source.numel for source in sources)
            cuts = find_cuts(sources, round(level * total))
            del sources
            for (name, data, config), cut in zip(live, cuts, strict=True):
                # update_mask, or update_packed_mask for a mask held packed
                self._update(name, data, {**config, "global_cut": cut})  # type: ignore[attr-defined]


def _common_level(live: list[tuple[str, torch.Tensor, dict[str, Any]]]) -> float:
    levels: dict[float, list[str]] = {}
    for name, _, config in live:
        levels.setdefault(config.get("sparsity_level"), []).append(name)
    if len(levels) > 1:
        shown = "; ".join(
            f"{level} for {', '.join(repr(n) for n in names[:3])}"
            + (" ..." if len(names) > 3 else "")
            for level, names in levels.items()
        )
        first = next(iter(levels))
        raise ConfigValueError(
            "sparsity_level",
            first,
            f"scope=global removes one level over all names, but the names differ ({shown}); "
            "give every name the same sparsity_level (no per-name level)",
        )
    return next(iter(levels))
