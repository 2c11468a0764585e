"""Tables split by rows across processes, sparsified with one threshold.

Recommendation models shard their embedding tables by rows, one shard a process or GPU. A
:class:`ShardedDataNormSparsifier` or :class:`ShardedMagnitudeSparsifier` in every process
(``torch.distributed``: gloo on CPU, nccl on GPU) holds that process's shard of each table and
steps together with the others: the threshold of a table is found over all its shards with
counts alone (:mod:`~sparsify_exp.sparsifier.dist_select`), so the union of the shards' masks
is the mask the single-process sparsifier gives the whole table, ties included (the
single-process order is by position; shards lie in the table's row order).

Every process calls ``add_data`` for the same names in the same order, and ``step`` the same
number of times: both are collective. A shard layout that does not make one table (overlaps,
gaps, different row shapes or dtypes) and a process that does not join within ``timeout_s``
raise :class:`ShardError` on every process that can tell, before anything changes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from sparsify_exp.sparsifier import block_ops
from sparsify_exp.sparsifier.data_norm import DataNormSparsifier, _ScoreKeys
from sparsify_exp.sparsifier.dist_select import find_sharded_cuts
from sparsify_exp.sparsifier.magnitude import MagnitudeSparsifier
from sparsify_exp.sparsifier.scope import _common_level
from sparsify_exp.sparsifier.select import (
    Cut,
    DataKeys,
    KeySource,
    apply_cut,
    common_key_dtype,
    key_dtype_for,
)

__all__ = [
    "ShardError",
    "ShardedDataNormSparsifier",
    "ShardedMagnitudeSparsifier",
    "ShardedMixin",
    "TableShard",
    "init_process_group",
]

_SHARD_KEY = "shard"  # state entry (start, stop, table rows, row entries): in state_dict()


class ShardError(ValueError):
    """Shards that do not make one table, or a process that did not join in time."""


@dataclass(frozen=True)
class TableShard:
    """Rows ``[start, stop)`` of a table of ``rows`` rows of ``row_numel`` entries each."""

    start: int
    stop: int
    rows: int
    row_numel: int

    @property
    def table_numel(self) -> int:
        return self.rows * self.row_numel


def init_process_group(
    backend: str | None = None, timeout_s: float = 60.0, **kwargs: Any
) -> dist.ProcessGroup:
    """The default process group from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), or the one already there. ``backend``: nccl when a GPU
    is there, else gloo. A rank that does not join within ``timeout_s`` makes the others fail
    with one :class:`ShardError` line instead of waiting forever."""
    if dist.is_initialized():
        return dist.group.WORLD  # type: ignore[return-value]
    if "init_method" not in kwargs and not {"RANK", "WORLD_SIZE"} <= os.environ.keys():
        raise ShardError(
            "process group: no RANK / WORLD_SIZE in the environment; launch the processes "
            "with torchrun (e.g. torchrun --nproc-per-node 2 ...)"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = os.environ.get("WORLD_SIZE", "?")
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    except (RuntimeError, ValueError) as error:  # DistStoreError, DistNetworkError
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise ShardError(
            f"process group: not all {world} ranks joined within {timeout_s:g} s at {where} "
            f"(a process died or never started; {_first_line(error)})"
        ) from None
    return dist.group.WORLD  # type: ignore[return-value]


class ShardedMixin:
    """``add_data`` and ``step`` over shards held by the processes of ``process_group``.

    Args:
        process_group: the processes holding the shards (``None``: the default group).
        timeout_s: how long a collective call waits for every process (gloo: a monitored
            barrier names the missing ranks); ``None`` waits as long as the group does.
    """

    scope: str

    def __init__(
        self,
        *args: Any,
        process_group: dist.ProcessGroup | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.process_group = process_group
        self.timeout_s = timeout_s
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ per sparsifier
    def _shard_items(self, config: dict[str, Any], shard: TableShard) -> tuple[int, int]:
        """``(items of the whole table, global position of this shard's first item)``."""
        raise NotImplementedError

    def _check_shard(
        self, config: dict[str, Any], shard: TableShard, starts: dict[int, int]
    ) -> str | None:
        """Why this layout (``starts``: each rank's first row) cannot be ranked as the whole
        table is (``None``: it can); the same answer on every process."""
        return None

    def _shard_keys(
        self,
        data: torch.Tensor,
        config: dict[str, Any],
        shard: TableShard,
        key_dtype: torch.dtype,
        mean: bool,
    ) -> KeySource:
        """The keys of this shard's items, computed as the whole table's would be."""
        raise NotImplementedError

    def _write_shard(
        self, name: str, data: torch.Tensor, config: dict[str, Any], source: KeySource, cut: Cut
    ) -> None:
        """This shard's mask from its ``cut``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ data
    def add_data(  # type: ignore[override]
        self,
        name: str,
        data: Any,
        reuse_mask: bool = True,
        row_offset: int | None = None,
        table_rows: int | None = None,
        **config: Any,
    ) -> Any:
        """Registers this process's shard of table ``name`` (collective: every process adds
        the same names in the same order).

        ``row_offset``: the table row the shard starts at; ``None`` on every process lays the
        shards end to end in rank order. ``table_rows``: the table's row count, to catch
        missing rows at its end; ``None``: the shards' end.
        """
        problem, weight = None, None
        try:
            weight = self._extract_weight(data)  # type: ignore[attr-defined]
            if weight.dim() == 0:
                problem = "a shard needs at least one dimension (its rows)"
            for key, value in (("row_offset", row_offset), ("table_rows", table_rows)):
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    problem = f"{key}={value!r}: must be an integer row count"
            merged = {
                **(self.data_groups.get(name) or self.defaults),  # type: ignore[attr-defined]
                **config,
            }
            merged.pop("mask", None)
            merged = self.validate_config(name, dict(merged))  # type: ignore[attr-defined]
        except (TypeError, ValueError) as error:
            problem = str(error)
        mine = {
            "name": name,
            "problem": problem,
            "rows": None if weight is None or problem else int(weight.shape[0]),
            "row_shape": None if weight is None or problem else tuple(weight.shape[1:]),
            "dtype": None if weight is None else str(weight.dtype),
            "offset": row_offset,
            "table_rows": table_rows,
        }
        everyone = self._exchange(f"add_data({name!r})", mine)
        shard, starts = _layout(name, everyone, self._rank())
        reason = self._check_shard(merged, shard, starts)
        if reason:
            raise ShardError(f"shards of {name!r}: {reason}")
        added = super().add_data(name, data, reuse_mask, **config)  # type: ignore[misc]
        layout = (shard.start, shard.stop, shard.rows, shard.row_numel)
        self.state[name][_SHARD_KEY] = layout  # type: ignore[attr-defined]
        return added

    def shard_of(self, name: str) -> TableShard:
        """Which rows of table ``name`` this process holds."""
        return TableShard(*self.state[name][_SHARD_KEY])  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ stepping
    def step(self) -> None:
        """One collective step: every table's threshold over all its shards (``scope="local"``)
        or one threshold over every table (``scope="global"``)."""
        if not self.enable_mask_update:  # type: ignore[attr-defined]
            return
        live = [
            (name, self.get_data(name), config)  # type: ignore[attr-defined]
            for name, config in self.data_groups.items()  # type: ignore[attr-defined]
            if not self.is_squashed(name)  # type: ignore[attr-defined]
        ]
        mine = (
            [name for name, _, _ in live],
            [_config_text(config) for _, _, config in live],
            (type(self).__name__, self.scope, getattr(self, "norm", None)),
        )
        everyone = self._exchange("step", mine)
        if any(other[0] != everyone[0][0] for other in everyone):
            shown = "; ".join(f"rank {r}: {e[0][:5]}" for r, e in enumerate(everyone))
            raise ShardError(f"step: the processes hold different names ({shown})")
        for index, (name, _, _) in enumerate(live):
            configs = [e[1][index] for e in everyone]
            if len(set(configs)) > 1:
                shown = "; ".join(f"rank {r}: {c}" for r, c in enumerate(configs))
                raise ShardError(f"step: the processes configure {name!r} differently ({shown})")
        if len({e[2] for e in everyone}) > 1:
            shown = "; ".join(f"rank {r}: {e[2]}" for r, e in enumerate(everyone))
            raise ShardError(f"step: the processes' sparsifiers differ ({shown})")
        if not live:
            return
        with torch.no_grad():
            if self.scope == "global":
                self._step_global(live)
            else:
                for name, data, config in live:
                    self._step_one(name, data, config)

    def _step_one(self, name: str, data: torch.Tensor, config: dict[str, Any]) -> None:
        shard = self.shard_of(name)
        items, offset = self._shard_items(config, shard)
        k = round(config["sparsity_level"] * items)
        source = self._shard_keys(data, config, shard, key_dtype_for(data.dtype), mean=False)
        (cut,) = find_sharded_cuts([source], k, items, [offset], self.process_group)
        self._write_shard(name, data, config, source, cut)

    def _step_global(self, live: list[tuple[str, torch.Tensor, dict[str, Any]]]) -> None:
        level = _common_level(live)
        key_dtype = common_key_dtype([data.dtype for _, data, _ in live])
        sources, offsets, total = [], [], 0
        for name, data, config in live:
            shard = self.shard_of(name)
            items, offset = self._shard_items(config, shard)
            sources.append(self._shard_keys(data, config, shard, key_dtype, mean=True))
            offsets.append(total + offset)
            total += items
        cuts = find_sharded_cuts(sources, round(level * total), total, offsets, self.process_group)
        for (name, data, config), source, cut in zip(live, sources, cuts, strict=True):
            self._write_shard(name, data, config, source, cut)

    # ------------------------------------------------------------------ collectives
    def _require_group(self) -> None:
        if not dist.is_initialized():
            raise ShardError(
                f"{type(self).__name__} steps with other processes: call "
                "sparsify_exp.sparsifier.sharded.init_process_group() (under torchrun) first"
            )

    def _rank(self) -> int:
        return dist.get_rank(self.process_group)

    def _exchange(self, what: str, mine: Any) -> list[Any]:
        """Every process's ``mine`` (small metadata), after checking that all joined."""
        self._require_group()
        self._join(what)
        everyone: list[Any] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(everyone, mine, group=self.process_group)
        return everyone

    def _join(self, what: str) -> None:
        """Waits for every process; a missing one is a :class:`ShardError`, not a hang."""
        group = self.process_group
        world = dist.get_world_size(group)
        try:
            if dist.get_backend(group) == "gloo":
                timeout = None if self.timeout_s is None else timedelta(seconds=self.timeout_s)
                dist.monitored_barrier(group, timeout=timeout, wait_all_ranks=True)
            else:
                dist.barrier(group)
        except RuntimeError as error:
            waited = f" within {self.timeout_s:g} s" if self.timeout_s is not None else ""
            raise ShardError(
                f"{what}: not all {world} processes joined{waited} (one died, hangs, or skipped "
                f"this call; nothing was changed): {_first_line(error)}"
            ) from None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state.pop("process_group", None)  # a process group cannot be pickled
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self.process_group = None


def _layout(
    name: str, everyone: list[dict[str, Any]], rank: int
) -> tuple[TableShard, dict[int, int]]:
    """This process's :class:`TableShard` of ``name`` once every process's claim is checked,
    and the first row of every rank holding rows."""
    problems = [
        f"rank {r}: {info['problem']}" for r, info in enumerate(everyone) if info["problem"]
    ]
    if problems:
        raise ShardError(f"add_data({name!r}): " + "; ".join(problems))
    names = {info["name"] for info in everyone}
    if len(names) > 1:
        shown = ", ".join(f"rank {r} {info['name']!r}" for r, info in enumerate(everyone))
        raise ShardError(f"add_data: the processes add different names at once ({shown})")
    where = f"shards of {name!r}"
    for key, what in (("row_shape", "row shapes"), ("dtype", "dtypes")):
        values = [info[key] for info in everyone]
        if len(set(values)) > 1:
            shown = ", ".join(
                f"rank {r} {list(v) if key == 'row_shape' else v}" for r, v in enumerate(values)
            )
            raise ShardError(f"{where}: different {what} ({shown}); a table's rows are alike")
    offsets = [info["offset"] for info in everyone]
    counts = [info["rows"] for info in everyone]
    if all(o is None for o in offsets):
        offsets = [sum(counts[:r]) for r in range(len(counts))]
    elif any(o is None for o in offsets):
        raise ShardError(f"{where}: row_offset given by some processes only ({offsets})")
    if any(o < 0 for o in offsets):
        raise ShardError(f"{where}: a negative row_offset ({offsets})")
    claimed = {info["table_rows"] for info in everyone}
    if len(claimed) > 1:
        raise ShardError(
            f"{where}: the processes disagree on table_rows ({sorted(claimed, key=str)})"
        )
    table_rows = claimed.pop()
    spans = sorted((offsets[r], offsets[r] + counts[r], r) for r in range(len(counts)) if counts[r])
    end = 0
    for start, stop, r in spans:
        if start > end:
            raise ShardError(f"{where}: rows {end}:{start} are held by no process (a gap)")
        if start < end:
            raise ShardError(
                f"{where}: rank {r}'s rows {start}:{stop} overlap rows held by another process "
                f"(up to row {end})"
            )
        end = stop
    rows = end if table_rows is None else int(table_rows)
    if end != rows:
        raise ShardError(
            f"{where}: the shards end at row {end} but table_rows={rows} (rows {min(end, rows)}:"
            f"{max(end, rows)} {'are held by no process' if end < rows else 'lie past the table'})"
        )
    start = offsets[rank]
    shard = TableShard(start, start + counts[rank], rows, math.prod(everyone[rank]["row_shape"]))
    return shard, {r: start for start, _, r in spans}


def _config_text(config: dict[str, Any]) -> str:
    """A name's config as the processes compare it (they must rank with the same one)."""
    return ", ".join(f"{k}={config[k]!r}" for k in sorted(config) if k != "mask")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _shard_2d(data: torch.Tensor) -> torch.Tensor:
    """A shard as ``(its rows, row entries)``: a block grid on it is a slice of the table's."""
    return data.reshape(data.shape[0], -1)


class ShardedDataNormSparsifier(ShardedMixin, DataNormSparsifier):
    r""":class:`DataNormSparsifier` over a table sharded by rows across processes.

    The union of the shards' masks is the mask of ``DataNormSparsifier`` on the whole table
    (``scope="global"``: on all the tables), ties included. Each shard must start at a
    multiple of the block's rows, so that blocks do not straddle processes, and the table's
    2-D view must be ``(rows, entries a row)`` (a table of one column is viewed as one row).

    Example (under ``torchrun --nproc-per-node 2``)::

        >>> init_process_group()
        >>> sp = ShardedDataNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 4))
        >>> sp.add_data("emb", my_rows)  # shards laid end to end in rank order
        >>> sp.step()
    """

    def __init__(
        self,
        data_list: Iterable[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        sparse_block_shape: tuple[int, int] = (1, 4),
        zeros_per_block: int | None = None,
        norm: str = "L1",
        scope: str = "local",
        process_group: dist.ProcessGroup | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(
            data_list,
            sparsity_level,
            sparse_block_shape,
            zeros_per_block,
            norm,
            scope,
            process_group=process_group,
            timeout_s=timeout_s,
        )

    def _shard_items(self, config: dict[str, Any], shard: TableShard) -> tuple[int, int]:
        block = config["sparse_block_shape"]
        rows, cols = block_ops.grid_shape(shard.rows, shard.row_numel, block)
        return rows * cols, (shard.start // block[0]) * cols

    def _check_shard(
        self, config: dict[str, Any], shard: TableShard, starts: dict[int, int]
    ) -> str | None:
        block = config["sparse_block_shape"]
        table = torch.empty(shard.rows, shard.row_numel, device="meta")
        if shard.table_numel and block_ops.as_2d(table).shape != table.shape:
            return (
                f"a table of {shard.rows} row(s) of {shard.row_numel} entry is viewed as one row "
                "by DataNormSparsifier; shard tables whose rows hold at least 2 entries"
            )
        for rank, start in starts.items():
            if start % block[0]:
                return (
                    f"rank {rank}'s rows start at {start}, not a multiple of the block's "
                    f"{block[0]} rows: a block would straddle processes"
                )
        return None

    def _shard_keys(
        self,
        data: torch.Tensor,
        config: dict[str, Any],
        shard: TableShard,
        key_dtype: torch.dtype,
        mean: bool,
    ) -> KeySource:
        block = config["sparse_block_shape"]
        if mean and block == (1, 1):  # as the single-process global step: the entries' keys
            return self._entry_keys(data, key_dtype)
        if data.numel() == 0:
            return _ScoreKeys(data.new_empty(0), 0, key_dtype, data.device)
        data2d = _shard_2d(data)
        rows, cols = block_ops.grid_shape(*data2d.shape, block)

        def scores() -> torch.Tensor:
            return _table_scores(data2d, block, self.norm, shard.table_numel, mean)

        # a local step holds its one grid; a global step recomputes it at each read
        held = scores() if not mean else scores
        return _ScoreKeys(held, rows * cols, key_dtype, data.device)

    def _write_shard(
        self, name: str, data: torch.Tensor, config: dict[str, Any], source: KeySource, cut: Cut
    ) -> None:
        block = config["sparse_block_shape"]
        zeros = config["zeros_per_block"]
        mask = self.get_mask(name)
        if data.numel() == 0 or zeros == 0 or cut.keeps_all:
            mask.fill_(True)
            return
        if cut.removes_all and zeros == block[0] * block[1]:
            mask.fill_(False)
            return
        if isinstance(source, DataKeys):  # (1, 1) blocks of a global step
            keep = torch.empty(mask.numel(), dtype=torch.bool, device=mask.device)
            apply_cut(source, cut, keep)
            mask.copy_(keep.view(mask.shape))
            return
        data2d = _shard_2d(data)
        grid = block_ops.grid_shape(*data2d.shape, block)
        keep = torch.empty(source.numel, dtype=torch.bool, device=data.device)
        apply_cut(source, cut, keep)
        self._write_removed(mask, data2d, keep.logical_not_().view(grid), block, zeros)


def _table_scores(
    data2d: torch.Tensor, block: tuple[int, int], norm: str, table_numel: int, mean: bool
) -> torch.Tensor:
    """A shard's block scores with the arithmetic of the whole table's: the path
    :func:`~sparsify_exp.sparsifier.block_ops.block_scores` takes depends on the data's size."""
    if table_numel <= block_ops.SMALL_ELEMENTS:
        return block_ops.block_scores(data2d, block, norm)  # the shard is small too
    scores = block_ops.chunked_block_scores(data2d, block, norm)
    per_block = block[0] * block[1]
    if mean and per_block > 1:
        scores.div_(per_block)  # as mean_scores does for large data
    return scores


class ShardedMagnitudeSparsifier(ShardedMixin, MagnitudeSparsifier):
    r""":class:`MagnitudeSparsifier` over tables sharded by rows across processes: the union
    of the shards' masks is the single-process mask of the whole table (``scope="global"``:
    of all the tables), ties included."""

    def __init__(
        self,
        data_list: Iterable[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        scope: str = "local",
        process_group: dist.ProcessGroup | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(
            data_list, sparsity_level, scope, process_group=process_group, timeout_s=timeout_s
        )

    def _shard_items(self, config: dict[str, Any], shard: TableShard) -> tuple[int, int]:
        return shard.table_numel, shard.start * shard.row_numel

    def _shard_keys(
        self,
        data: torch.Tensor,
        config: dict[str, Any],
        shard: TableShard,
        key_dtype: torch.dtype,
        mean: bool,
    ) -> KeySource:
        return DataKeys(data, key_dtype)

    def _write_shard(
        self, name: str, data: torch.Tensor, config: dict[str, Any], source: KeySource, cut: Cut
    ) -> None:
        mask = self.get_mask(name)
        keep = torch.empty(mask.numel(), dtype=torch.bool, device=mask.device)
        apply_cut(source, cut, keep)
        mask.copy_(keep.view(mask.shape))
