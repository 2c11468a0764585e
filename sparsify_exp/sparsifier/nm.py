"""NMSparsifier: N:M semi-structured sparsity, e.g. 2:4 for sparse tensor cores."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from sparsify_exp.errors import ConfigValueError
from sparsify_exp.sparsifier.base import BaseDataSparsifier, _extract_weight
from sparsify_exp.sparsifier.block_ops import CHUNK_ELEMENTS
from sparsify_exp.sparsifier.mask import flat_keep
from sparsify_exp.sparsifier.packed_mask import PackedMask
from sparsify_exp.sparsifier.scope import check_scope
from sparsify_exp.sparsifier.select import flat_views, key_dtype_for, magnitude_keys

__all__ = ["NMSparsifier"]

# groups up to this size rank their entries by pairwise comparisons; larger ones by a sort
_PAIRWISE_MAX_M = 16


def _check_m(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigValueError("m", value, "must be an integer >= 1 (the entries of a group)")
    return int(value)


def _check_n(value: Any, m: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigValueError("n", value, "must be an integer >= 0 (the entries kept a group)")
    if value > m:
        raise ConfigValueError("n", value, f"must be <= m={m} (n of every m entries are kept)")
    return int(value)


def _check_groups(name: str, shape: Sequence[int], m: int) -> None:
    """Groups of ``m`` consecutive entries must tile the last dimension of ``name``."""
    last = shape[-1] if len(shape) else 1
    if last % m:
        raise ConfigValueError(
            "m",
            m,
            f"does not divide the last dimension ({last}) of its shape {tuple(shape)}: "
            f"N:M groups are m consecutive entries of a row; skip this data or choose an m "
            f"that divides {last}",
            name=name,
        )


def _keep_largest(
    keys: torch.Tensor, n: int, keep: torch.Tensor, scratch: dict[str, torch.Tensor]
) -> None:
    """``keep`` (G, m) = the ``n`` largest keys of each row of ``keys`` (G, m); among equal
    keys the later entries rank higher (the first ones are removed first). ``scratch`` holds
    buffers reused from chunk to chunk."""
    groups, m = keys.shape
    if m > _PAIRWISE_MAX_M:
        order = torch.sort(keys, dim=1, stable=True).indices
        keep.fill_(True)
        keep.scatter_(1, order[:, : m - n], False)
        return
    if "rank" not in scratch or scratch["rank"].numel() < keys.numel():
        scratch["rank"] = torch.empty(keys.numel(), dtype=torch.uint8, device=keys.device)
        scratch["below"] = torch.empty(groups, dtype=torch.bool, device=keys.device)
    # rank[i] = entries of the group ranking below entry i: j < i with key_j <= key_i, and
    # j > i with key_j < key_i; entry i is kept when at least m - n rank below it
    rank = scratch["rank"][: keys.numel()].view(groups, m).zero_()
    below = scratch["below"][:groups]
    for i in range(m):
        for j in range(i + 1, m):
            torch.le(keys[:, i], keys[:, j], out=below)  # i ranks below j
            rank[:, j] += below
            rank[:, i] += below.logical_not_()
    torch.ge(rank, m - n, out=keep)


class NMSparsifier(BaseDataSparsifier):
    r"""In every group of ``m`` consecutive entries along the last dimension, keeps the ``n``
    of largest ``|x|`` and zeroes the others: ``n=2, m=4`` is the 2:4 pattern that
    ``torch.sparse.to_sparse_semi_structured`` (sparse tensor cores) accepts.

    * ``n``: entries kept a group, ``0 <= n <= m``.
    * ``m``: entries a group, ``>= 1``. The last dimension of every data must be a multiple of
      ``m`` (a :class:`~sparsify_exp.errors.ConfigValueError` naming the data otherwise, from
      ``add_data``); 0-d data counts as one entry.

    Both are defaults that ``add_data(name, data, **config)`` may override per name. Every
    group loses exactly ``m - n`` entries whatever it holds: ranking is ``|x|`` as
    ``torch.sort`` orders it -- finite, then ``+/-inf``, then NaN (kept first) -- and equal
    magnitudes go by position, the first ones removed first. The masks of torch's reference
    ``DataNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, m),
    zeros_per_block=m - n)`` on data without ties. A step reads the data once, in chunks; its
    extra memory is a few chunks. ``scope="global"`` is not supported.
    """

    def __init__(
        self,
        data_list: Iterable[tuple[str, Any]] | None = None,
        n: int = 2,
        m: int = 4,
        scope: str = "local",
    ) -> None:
        _check_n(n, _check_m(m))
        self.scope = check_scope(scope, type(self).__name__, has_global=False)
        super().__init__(data_list=data_list, n=n, m=m)

    def validate_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        try:
            config["m"] = _check_m(config.get("m"))
            config["n"] = _check_n(config.get("n"), config["m"])
        except ConfigValueError as error:
            raise error.for_name(name) from None
        return config

    def add_data(self, name: str, data: Any, reuse_mask: bool = True, **config: Any) -> Any:
        """As :meth:`BaseDataSparsifier.add_data`, and first checks that groups of ``m`` tile
        the data's last dimension (nothing is added otherwise)."""
        weight = _extract_weight(data)
        base = self.data_groups.get(name, self.defaults) if isinstance(name, str) else {}
        merged = {**base, **{k: v for k, v in config.items() if k != "mask"}}
        m = merged.get("m")
        if isinstance(m, int) and not isinstance(m, bool) and m >= 1:
            _check_groups(name, weight.shape, m)
        return super().add_data(name, data, reuse_mask=reuse_mask, **config)

    def update_mask(  # type: ignore[override]
        self, name: str, data: torch.Tensor, n: int, m: int, **kwargs: Any
    ) -> None:
        m = _check_m(m)
        n = _check_n(n, m)
        _check_groups(name, data.shape, m)
        mask = self.get_mask(name)
        if data.numel() == 0 or n == m:
            mask.fill_(True)
            return
        if n == 0:
            mask.fill_(False)
            return
        with flat_keep(mask) as keep:
            for start, keys, scratch in self._groups(data, n, m):
                out = keep[start : start + keys.numel()]
                _keep_largest(keys.view(-1, m), n, out.view(-1, m), scratch)

    def update_packed_mask(  # type: ignore[override]
        self, name: str, data: torch.Tensor, mask: PackedMask, n: int, m: int, **kwargs: Any
    ) -> None:
        """The step into a packed mask: each chunk of groups is ranked and packed in turn."""
        m = _check_m(m)
        n = _check_n(n, m)
        _check_groups(name, data.shape, m)
        if data.numel() == 0 or n in (0, m):
            mask.fill_(n == m or data.numel() == 0)
            return
        flat = mask.reshape(-1)
        out = torch.empty(0, dtype=torch.bool, device=data.device)
        for start, keys, scratch in self._groups(data, n, m):
            if out.numel() < keys.numel():
                out = torch.empty(keys.numel(), dtype=torch.bool, device=data.device)
            chunk = out[: keys.numel()]
            _keep_largest(keys.view(-1, m), n, chunk.view(-1, m), scratch)
            flat.write(start, chunk)

    @staticmethod
    def _groups(
        data: torch.Tensor, n: int, m: int
    ) -> Iterator[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]:
        """``(start, keys, scratch)``: the ``|x|`` keys of chunks of whole groups."""
        key_dtype = key_dtype_for(data.dtype)
        limit = max(m, CHUNK_ELEMENTS // m * m)  # chunks hold whole groups
        buffer = torch.empty(min(limit, data.numel()), dtype=key_dtype, device=data.device)
        scratch: dict[str, torch.Tensor] = {}
        for start, view in flat_views(data, limit):
            yield start, magnitude_keys(view, key_dtype, out=buffer), scratch
