"""MagnitudeSparsifier: removes the entries of smallest ``|x|``, per name or over all names."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from sparsify_exp.sparsifier.base import BaseDataSparsifier
from sparsify_exp.sparsifier.checks import check_level, checked_config
from sparsify_exp.sparsifier.mask import flat_keep
from sparsify_exp.sparsifier.packed_mask import PackedMask
from sparsify_exp.sparsifier.packed_select import EntryKeys, apply_cut_packed, select_packed
from sparsify_exp.sparsifier.scope import GlobalScopeMixin, check_scope
from sparsify_exp.sparsifier.select import (
    Cut,
    DataKeys,
    KeySource,
    apply_cut,
    key_dtype_for,
    select_and_write,
)

__all__ = ["MagnitudeSparsifier"]


class MagnitudeSparsifier(GlobalScopeMixin, BaseDataSparsifier):
    r"""Zeroes the ``round(sparsity_level * numel)`` entries of smallest ``|x|`` of each data.

    The masks of ``torch.nn.utils.prune.l1_unstructured`` (``amount=sparsity_level``) on data
    without ties, for any shape (the entries are ranked flat) and any dtype.

    * ``sparsity_level``: fraction of entries removed, in ``[0, 1]``; a default that
      ``add_data(name, data, sparsity_level=...)`` may override per name.
    * ``scope``: ``"local"`` (each name loses its own fraction) or ``"global"``: one threshold
      over the entries of every name, ``round(sparsity_level * total)`` removed in all, so
      names lose different fractions -- the masks of ``prune.global_unstructured(...,
      pruning_method=prune.L1Unstructured, amount=sparsity_level)``. Every name then needs the
      same ``sparsity_level``.

    Exactly that many entries go whatever the data holds. Ranking, as ``torch.sort`` orders
    ``|x|``: finite values first, then ``+inf`` and ``-inf`` (equal), then NaN, which is
    removed last; equal magnitudes (``0.0`` and ``-0.0``, every NaN) go by position, the first
    ones first (globally: by the order names were added, then by position). Complex data is
    ranked by ``torch.abs``. A step reads the data in chunks: no sort, no full-size
    temporary; its extra memory is a chunk plus the few percent of entries whose magnitude is
    near the threshold.
    """

    def __init__(
        self,
        data_list: Iterable[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        scope: str = "local",
    ) -> None:
        check_level(sparsity_level)
        self.scope = check_scope(scope, type(self).__name__, has_global=True)
        super().__init__(data_list=data_list, sparsity_level=sparsity_level)

    def validate_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        return checked_config(name, config, {"sparsity_level": check_level})

    def update_mask(  # type: ignore[override]
        self,
        name: str,
        data: torch.Tensor,
        sparsity_level: float,
        global_cut: Cut | None = None,
        **kwargs: Any,
    ) -> None:
        mask = self.get_mask(name)
        with flat_keep(mask) as keep:
            if global_cut is None:
                level = check_level(sparsity_level)
                source = DataKeys(data, key_dtype_for(data.dtype))
                select_and_write(source, round(level * data.numel()), keep)
            else:
                apply_cut(DataKeys(data, global_cut.key_dtype), global_cut, keep)

    def update_packed_mask(  # type: ignore[override]
        self,
        name: str,
        data: torch.Tensor,
        mask: PackedMask,
        sparsity_level: float,
        global_cut: Cut | None = None,
        **kwargs: Any,
    ) -> None:
        """The step into a packed mask: one pass over the data in chunks (a local step also
        reads a few stripes first), the mask at 1 bit an entry."""
        flat = mask.reshape(-1)
        if global_cut is None:
            level = check_level(sparsity_level)
            source = EntryKeys(data, key_dtype_for(data.dtype))
            select_packed(source, round(level * data.numel()), flat)
        else:
            apply_cut_packed(EntryKeys(data, global_cut.key_dtype), global_cut, flat)

    def _global_keys(
        self, name: str, data: torch.Tensor, config: dict[str, Any], key_dtype: torch.dtype
    ) -> KeySource:
        return DataKeys(data, key_dtype)
