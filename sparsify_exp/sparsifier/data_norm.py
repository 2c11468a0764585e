"""DataNormSparsifier: removes the blocks of lowest L1/L2 norm, as torch's reference does."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from sparsify_exp.errors import ConfigValueError
from sparsify_exp.sparsifier import block_ops
from sparsify_exp.sparsifier.base import BaseDataSparsifier
from sparsify_exp.sparsifier.checks import check_level, check_norm
from sparsify_exp.sparsifier.mask import flat_keep
from sparsify_exp.sparsifier.packed_mask import PackedMask
from sparsify_exp.sparsifier.packed_select import BlockScoreKeys, select_packed, write_block_rows
from sparsify_exp.sparsifier.scope import GlobalScopeMixin, check_scope
from sparsify_exp.sparsifier.select import Cut, DataKeys, KeySource, apply_cut, magnitude_keys

__all__ = ["DataNormSparsifier"]


def _check_block(value: Any) -> tuple[int, int]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ConfigValueError(
            "sparse_block_shape", value, "must have 2 entries (rows, cols), e.g. (1, 4)"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ConfigValueError("sparse_block_shape", value, "every entry must be an integer >= 1")
    return (int(value[0]), int(value[1]))


def _check_zeros(value: Any, block: tuple[int, int]) -> int:
    per_block = block[0] * block[1]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigValueError("zeros_per_block", value, "must be an integer >= 0")
    if value > per_block:
        raise ConfigValueError(
            "zeros_per_block",
            value,
            f"must be <= {per_block}, the entries of a {block[0]}x{block[1]} block",
        )
    return int(value)


def mean_scores(data2d: torch.Tensor, block: tuple[int, int], norm: str) -> torch.Tensor:
    """Each block's mean of ``|x|`` (L1) or ``|x|**2`` (L2) over its valid entries: scores
    that compare across data of any size and block shape (a global step ranks them together).
    """
    scores = block_ops.block_scores(data2d, block, norm)
    per_block = block[0] * block[1]
    if data2d.numel() > block_ops.SMALL_ELEMENTS and per_block > 1:
        scores.div_(per_block)  # the chunked path returns sums on the full-block scale
    return scores


class _ScoreKeys(KeySource):
    """Keys of a block-score grid: a tensor, or a function computing it at each read (a global
    step holds one name's grid at a time)."""

    def __init__(
        self,
        scores: torch.Tensor | Callable[[], torch.Tensor],
        numel: int,
        key_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self._scores = scores
        self.numel = numel
        self.key_dtype = key_dtype
        self.device = device

    def scores(self) -> torch.Tensor:
        return self._scores if isinstance(self._scores, torch.Tensor) else self._scores()

    def keys_at(self, positions: torch.Tensor) -> torch.Tensor:
        return magnitude_keys(self.scores().view(-1)[positions], self.key_dtype)

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        flat = self.scores().view(-1)
        size = min(block_ops.CHUNK_ELEMENTS, self.numel)
        buffer = torch.empty(size, dtype=self.key_dtype, device=self.device)
        for start in range(0, self.numel, block_ops.CHUNK_ELEMENTS):
            chunk = flat[start : start + block_ops.CHUNK_ELEMENTS]
            yield start, magnitude_keys(chunk, self.key_dtype, out=buffer)


class DataNormSparsifier(GlobalScopeMixin, BaseDataSparsifier):
    r"""Zeroes the blocks of data with the lowest mean ``|x|`` (L1) or ``|x|**2`` (L2).

    * ``sparsity_level``: fraction of blocks removed, ``round(sparsity_level * num_blocks)``,
      exactly that many whatever the data holds (NaN, inf, ties).
    * ``sparse_block_shape``: ``(rows, cols)`` of a block; blocks start at index 0 and the
      last row/column of blocks may be partial (scored by the mean of its valid entries).
    * ``zeros_per_block``: how many of a removed block's entries are zeroed, smallest first;
      ``None`` means the whole block. ``(1, 4)`` with ``zeros_per_block=2`` at level 1.0 is
      2:4 semi-structured sparsity. A partial block zeroes ``min(zeros_per_block, entries)``.
    * ``norm``: ``"L1"`` or ``"L2"``.
    * ``scope``: ``"local"`` (each data loses ``sparsity_level`` of its blocks) or
      ``"global"``: one threshold over the block scores (means) of every data, so
      ``round(sparsity_level * total blocks)`` are removed in all and data lose different
      fractions; ties go by the order data were added, then by position. With ``(1, 1)``
      blocks and L1 the masks are those of ``torch.nn.utils.prune.global_unstructured(...,
      pruning_method=prune.L1Unstructured, amount=sparsity_level)``. Every data then needs
      the same ``sparsity_level``; block shapes and ``zeros_per_block`` may differ.

    All but ``norm`` and ``scope`` are defaults that ``add_data(name, data, **config)`` may
    override per name. Data is viewed as 2-D: size-1 dims dropped, 1-D as one row, N-D as
    ``(shape[0], -1)``. Masks equal the reference's on data without ties; ties are broken by
    position (the first blocks go first). A step reads the data once, in chunks, and
    allocates about a quarter of it.

    Non-finite data ranks as ``torch.sort`` (and so the reference) orders it: a block holding
    NaN scores NaN and a block holding ``+inf`` or ``-inf`` (and no NaN) scores ``+inf``;
    finite scores go first, then ``+inf`` blocks, then NaN blocks, so NaN blocks are removed
    last, the first by position when some must go. Inside a removed block the same order
    picks the entries zeroed. Complex data is ranked by magnitude, ``|x|`` for L1 and
    ``|x|**2`` for L2 (the reference does L1 so and cannot do L2), with ``|x|`` as
    ``torch.abs`` has it: ``+inf`` when a part is infinite, even if the other is NaN, else NaN
    when a part is NaN.
    """

    def __init__(
        self,
        data_list: Iterable[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        sparse_block_shape: tuple[int, int] = (1, 4),
        zeros_per_block: int | None = None,
        norm: str = "L1",
        scope: str = "local",
    ) -> None:
        block = _check_block(sparse_block_shape)
        check_level(sparsity_level)
        if zeros_per_block is not None:
            _check_zeros(zeros_per_block, block)
        self.norm = check_norm(norm)
        self.scope = check_scope(scope, type(self).__name__, has_global=True)
        super().__init__(
            data_list=data_list,
            sparsity_level=sparsity_level,
            sparse_block_shape=block,
            zeros_per_block=zeros_per_block,
        )

    def validate_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        try:
            config["sparsity_level"] = check_level(config.get("sparsity_level"))
            block = _check_block(config.get("sparse_block_shape"))
            config["sparse_block_shape"] = block
            zeros = config.get("zeros_per_block")
            config["zeros_per_block"] = (
                block[0] * block[1] if zeros is None else _check_zeros(zeros, block)
            )
        except ConfigValueError as error:
            raise error.for_name(name) from None
        return config

    def update_mask(  # type: ignore[override]
        self,
        name: str,
        data: torch.Tensor,
        sparsity_level: float,
        sparse_block_shape: tuple[int, int],
        zeros_per_block: int | None,
        global_cut: Cut | None = None,
        **kwargs: Any,
    ) -> None:
        level = check_level(sparsity_level)
        block = _check_block(sparse_block_shape)
        per_block = block[0] * block[1]
        zeros = per_block if zeros_per_block is None else _check_zeros(zeros_per_block, block)
        mask = self.get_mask(name)
        if global_cut is not None:
            self._write_cut(mask, data, block, zeros, global_cut)
            return
        if data.numel() == 0:  # no blocks (and no 2-D view of, e.g., shape (0,))
            mask.fill_(True)
            return

        data2d = block_ops.as_2d(data)
        rows, cols = block_ops.grid_shape(*data2d.shape, block)
        num_remove = round(level * (rows * cols))  # as torch: level * num_blocks
        if num_remove == 0 or zeros == 0:
            mask.fill_(True)
            return
        if num_remove == rows * cols and zeros == per_block:
            mask.fill_(False)
            return

        scores = block_ops.block_scores(data2d, block, self.norm)
        removed = block_ops.smallest_k(scores, num_remove)
        del scores
        self._write_removed(mask, data2d, removed, block, zeros)

    def update_packed_mask(  # type: ignore[override]
        self,
        name: str,
        data: torch.Tensor,
        mask: PackedMask,
        sparsity_level: float,
        sparse_block_shape: tuple[int, int],
        zeros_per_block: int | None,
        global_cut: Cut | None = None,
        **kwargs: Any,
    ) -> None:
        """The local step into a packed mask: one pass over the data (two with
        ``zeros_per_block``), the block grid's keep bits and the mask at 1 bit each."""
        config = {"sparse_block_shape": sparse_block_shape, "zeros_per_block": zeros_per_block}
        if global_cut is not None:  # the base's unpacked step
            super().update_packed_mask(
                name, data, mask, sparsity_level=sparsity_level, global_cut=global_cut, **config
            )
            return
        level = check_level(sparsity_level)
        block = _check_block(sparse_block_shape)
        per_block = block[0] * block[1]
        zeros = per_block if zeros_per_block is None else _check_zeros(zeros_per_block, block)
        if data.numel() == 0:
            mask.fill_(True)
            return
        data2d = block_ops.as_2d(data)
        rows, cols = block_ops.grid_shape(*data2d.shape, block)
        num_remove = round(level * (rows * cols))
        if num_remove == 0 or zeros == 0 or (num_remove == rows * cols and zeros == per_block):
            mask.fill_(num_remove == 0 or zeros == 0)
            return
        grid = PackedMask.full((rows, cols), device=data.device)
        select_packed(BlockScoreKeys(data2d, block, self.norm), num_remove, grid.reshape(-1))
        write_block_rows(mask, data2d, grid, block, zeros, self.norm)

    def _write_removed(
        self,
        mask: torch.Tensor,
        data2d: torch.Tensor,
        removed: torch.Tensor,
        block: tuple[int, int],
        zeros: int,
    ) -> None:
        """``mask`` from the grid of ``removed`` blocks (a ``bool`` it may overwrite)."""
        with flat_keep(mask) as keep:
            out2d = keep.view(data2d.shape)
            if zeros == block[0] * block[1]:
                block_ops.write_block_mask(out2d, removed.logical_not_(), block)
            else:
                block_ops.write_in_block_mask(out2d, data2d, removed, block, zeros, self.norm)

    def _write_cut(
        self, mask: torch.Tensor, data: torch.Tensor, block: tuple[int, int], zeros: int, cut: Cut
    ) -> None:
        """The mask of a global step: the blocks ``cut`` removes, ``zeros`` entries each."""
        if data.numel() == 0 or zeros == 0 or cut.keeps_all:
            mask.fill_(True)
            return
        if cut.removes_all and zeros == block[0] * block[1]:
            mask.fill_(False)
            return
        if block == (1, 1):  # the scores are the entries' own magnitudes: no grid
            with flat_keep(mask) as keep:
                apply_cut(self._entry_keys(data, cut.key_dtype), cut, keep)
            return
        data2d = block_ops.as_2d(data)
        scores = mean_scores(data2d, block, self.norm)
        grid = scores.shape
        keep = torch.empty(scores.numel(), dtype=torch.bool, device=scores.device)
        apply_cut(_ScoreKeys(scores, keep.numel(), cut.key_dtype, scores.device), cut, keep)
        del scores
        self._write_removed(mask, data2d, keep.logical_not_().view(grid), block, zeros)

    def _entry_keys(self, data: torch.Tensor, key_dtype: torch.dtype) -> DataKeys:
        """(1, 1) blocks: the keys of each entry's score (``|x|`` or ``|x|**2``), read from the
        data in chunks in the order of the 2-D view (row-major, as the data's own)."""
        return DataKeys(data, key_dtype, square=self.norm == "L2")

    def _global_keys(
        self, name: str, data: torch.Tensor, config: dict[str, Any], key_dtype: torch.dtype
    ) -> KeySource:
        block = _check_block(config.get("sparse_block_shape"))
        if block == (1, 1):
            return self._entry_keys(data, key_dtype)
        if data.numel() == 0:
            return _ScoreKeys(lambda: data.new_empty(0), 0, key_dtype, data.device)
        data2d = block_ops.as_2d(data)
        rows, cols = block_ops.grid_shape(*data2d.shape, block)
        return _ScoreKeys(
            lambda: mean_scores(data2d, block, self.norm), rows * cols, key_dtype, data.device
        )
