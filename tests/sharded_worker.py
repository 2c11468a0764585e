"""One process of a ``torchrun --nproc-per-node 2`` launch by ``tests/test_sharded.py``.

``cases``: every rank builds the same tables, keeps its rows, steps the sharded sparsifier
and compares its mask with its rows of the single-process sparsifier's mask of the whole
table. ``bad``: layouts that do not make one table must raise ``ShardError`` on every rank
and leave the data and the sparsifier as they were; last, rank 1 stops taking part and rank
0's next step must end in one line. ``missing-init``: rank 1 never joins. ``cuda``: one rank
on nccl holds each whole table in GPU memory and its mask must equal the single-process mask
on the CPU. Each rank writes one JSON line a result to ``<out_dir>/rank<r>.jsonl``.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sparsify_exp import DataNormSparsifier, MagnitudeSparsifier
from sparsify_exp.sparsifier.sharded import (
    ShardedDataNormSparsifier,
    ShardedMagnitudeSparsifier,
    ShardError,
    init_process_group,
)

TIMEOUT_S = 3.0


def _ints(seed: int, shape: tuple[int, ...], low: int, high: int, dtype=torch.float32):
    """Integer-valued data: many blocks and entries share a score."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=gen).to(dtype)


def _normal(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _with_nonfinite(table: torch.Tensor) -> torch.Tensor:
    flat = table.view(-1)
    flat[3], flat[17], flat[40], flat[-2] = float("nan"), float("inf"), float("-inf"), float("nan")
    return table


# name -> (sharded class, single-process class, constructor kwargs, tables, per-name config,
#          rows of rank 0 for each table (rank 1 holds the rest))
CASES: dict[str, tuple[Any, Any, dict, dict, dict, dict]] = {
    "data_norm_l1_even": (
        ShardedDataNormSparsifier,
        DataNormSparsifier,
        {"sparsity_level": 0.5},
        {"t": _normal(0, (16, 12))},
        {},
        {"t": 8},
    ),
    "data_norm_l2_ties_uneven_partial_blocks": (
        ShardedDataNormSparsifier,
        DataNormSparsifier,
        {"sparsity_level": 0.6, "sparse_block_shape": (2, 3), "norm": "L2", "zeros_per_block": 2},
        {"t": _ints(1, (23, 10), 0, 3)},
        {},
        {"t": 10},
    ),
    "data_norm_large_table_small_shard": (
        ShardedDataNormSparsifier,
        DataNormSparsifier,
        {"sparsity_level": 0.7, "sparse_block_shape": (1, 3)},
        {"t": _ints(2, (300, 256), 0, 5)},
        {},
        {"t": 40},
    ),
    "data_norm_float64_ties": (
        ShardedDataNormSparsifier,
        DataNormSparsifier,
        {"sparsity_level": 0.35, "sparse_block_shape": (1, 2)},
        {"t": _ints(3, (19, 6), 0, 3, torch.float64)},
        {},
        {"t": 4},
    ),
    "data_norm_global_ties": (
        ShardedDataNormSparsifier,
        DataNormSparsifier,
        {"sparsity_level": 0.55, "scope": "global"},
        {
            "a": _ints(4, (12, 8), 0, 4),
            "b": _ints(5, (9, 6), 0, 4),
            "c": _ints(6, (300, 256), 0, 6),
        },
        {"b": {"sparse_block_shape": (1, 1)}, "c": {"sparse_block_shape": (1, 3)}},
        {"a": 5, "b": 2, "c": 260},
    ),
    "magnitude_ties_nonfinite_uneven": (
        ShardedMagnitudeSparsifier,
        MagnitudeSparsifier,
        {"sparsity_level": 0.45},
        {"t": _with_nonfinite(_ints(7, (37, 9), -3, 4))},
        {},
        {"t": 5},
    ),
    "magnitude_large_sampled": (
        ShardedMagnitudeSparsifier,
        MagnitudeSparsifier,
        {"sparsity_level": 0.8},
        {"t": _ints(8, (700, 512), -25, 25)},
        {},
        {"t": 300},
    ),
    "magnitude_float16_3d": (
        ShardedMagnitudeSparsifier,
        MagnitudeSparsifier,
        {"sparsity_level": 0.3},
        {"t": _ints(9, (11, 4, 5), -2, 3, torch.float16)},
        {},
        {"t": 6},
    ),
    "magnitude_global": (
        ShardedMagnitudeSparsifier,
        MagnitudeSparsifier,
        {"sparsity_level": 0.3, "scope": "global"},
        {"x": _ints(10, (20, 7), -2, 3), "y": torch.round(_normal(11, (11, 13)) * 2)},
        {},
        {"x": 13, "y": 1},
    ),
    "empty_shard": (
        ShardedDataNormSparsifier,
        DataNormSparsifier,
        {"sparsity_level": 0.5, "sparse_block_shape": (1, 2)},
        {"t": _ints(12, (9, 8), 0, 3)},
        {},
        {"t": 0},
    ),
}


def _rows(rank: int, total: int, first: int) -> tuple[int, int]:
    return (0, first) if rank == 0 else (first, total)


def run_case(name: str, rank: int) -> dict[str, Any]:
    sharded_cls, single_cls, kwargs, tables, per_name, split = CASES[name]
    sp = sharded_cls(**kwargs, timeout_s=60)
    ref = single_cls(**kwargs)
    spans = {}
    for table_name, table in tables.items():
        start, stop = spans[table_name] = _rows(rank, table.shape[0], split[table_name])
        config = per_name.get(table_name, {})
        sp.add_data(table_name, table[start:stop].clone(), **config)
        ref.add_data(table_name, table.clone(), **config)
    sp.step()
    ref.step()
    wrong = {}
    for table_name, (start, stop) in spans.items():
        mine, want = sp.get_mask(table_name), ref.get_mask(table_name)[start:stop]
        if not torch.equal(mine, want):
            wrong[table_name] = int((mine != want).sum())
    return {"ok": not wrong, "wrong_entries": wrong}


def run_cuda_case(name: str) -> dict[str, Any]:
    """The whole table on this rank's GPU (one rank on nccl) against the CPU's mask."""
    sharded_cls, single_cls, kwargs, tables, per_name, _ = CASES[name]
    sp = sharded_cls(**kwargs, timeout_s=60)
    ref = single_cls(**kwargs)
    for table_name, table in tables.items():
        config = per_name.get(table_name, {})
        sp.add_data(table_name, table.cuda(), **config)
        ref.add_data(table_name, table.clone(), **config)
    sp.step()
    ref.step()
    wrong = {
        n: int((sp.get_mask(n).cpu() != ref.get_mask(n)).sum())
        for n in tables
        if not torch.equal(sp.get_mask(n).cpu(), ref.get_mask(n))
    }
    on_gpu = all(sp.get_mask(n).device.type == "cuda" for n in tables)
    return {"ok": not wrong and on_gpu, "wrong_entries": wrong, "on_gpu": on_gpu}


def run_reversed(rank: int) -> dict[str, Any]:
    """Explicit row offsets: rank 0 holds the table's last rows, rank 1 its first."""
    table = _ints(13, (20, 6), 0, 3)
    start, stop = (12, 20) if rank == 0 else (0, 12)
    sp = ShardedDataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(2, 2), timeout_s=60)
    sp.add_data("t", table[start:stop].clone(), row_offset=start, table_rows=20)
    sp.step()
    ref = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(2, 2))
    ref.add_data("t", table.clone())
    ref.step()
    return {"ok": bool(torch.equal(sp.get_mask("t"), ref.get_mask("t")[start:stop]))}


def run_checkpoint(rank: int) -> dict[str, Any]:
    """A pickled copy and a state_dict keep each shard's rows and step as the original."""
    table = _ints(15, (10, 8), 0, 3)
    start, stop = _rows(rank, 10, 4)
    sp = ShardedDataNormSparsifier(sparsity_level=0.5, timeout_s=60)
    sp.add_data("t", table[start:stop].clone())
    sp.step()
    copied = pickle.loads(pickle.dumps(sp))
    loaded = ShardedDataNormSparsifier(timeout_s=60)
    loaded.load_state_dict(sp.state_dict())
    loaded.get_mask("t").fill_(True)
    loaded.step()  # collective: the restored rows rank as before
    return {
        "ok": torch.equal(copied.get_mask("t"), sp.get_mask("t"))
        and copied.shard_of("t") == sp.shard_of("t") == loaded.shard_of("t")
        and torch.equal(loaded.get_mask("t"), sp.get_mask("t"))
    }


# name -> (sparsifier factory, this rank's shard, add_data kwargs, words the error must hold)
BAD: dict[str, Callable[[int], tuple[Any, torch.Tensor, dict, str]]] = {
    "overlap": lambda r: (
        ShardedMagnitudeSparsifier(timeout_s=60),
        torch.ones(5, 4),
        {"row_offset": 0 if r == 0 else 3},
        "overlap",
    ),
    "gap": lambda r: (
        ShardedMagnitudeSparsifier(timeout_s=60),
        torch.ones(5, 4),
        {"row_offset": 0 if r == 0 else 6},
        "held by no process",
    ),
    "columns": lambda r: (
        ShardedMagnitudeSparsifier(timeout_s=60),
        torch.ones(5, 8 if r == 0 else 6),
        {},
        "different row shapes",
    ),
    "missing_last_rows": lambda r: (
        ShardedMagnitudeSparsifier(timeout_s=60),
        torch.ones(5, 4),
        {"table_rows": 12},
        "rows 10:12 are held by no process",
    ),
    "past_the_table": lambda r: (
        ShardedMagnitudeSparsifier(timeout_s=60),
        torch.ones(5, 4),
        {"table_rows": 8},
        "lie past the table",
    ),
    "block_straddles": lambda r: (
        ShardedDataNormSparsifier(sparse_block_shape=(2, 4), timeout_s=60),
        torch.ones(3 if r == 0 else 5, 8),
        {},
        "straddle",
    ),
    "dtypes": lambda r: (
        ShardedMagnitudeSparsifier(timeout_s=60),
        torch.ones(5, 4, dtype=torch.float32 if r == 0 else torch.float64),
        {},
        "different dtypes",
    ),
    "one_rank_bad_config": lambda r: (
        ShardedMagnitudeSparsifier(timeout_s=60),
        torch.ones(5, 4),
        {"sparsity_level": 0.5 if r == 0 else 2.0},
        "rank 1: data 't': sparsity_level=2.0",
    ),
    "offset_not_an_integer": lambda r: (
        ShardedMagnitudeSparsifier(timeout_s=60),
        torch.ones(5, 4),
        {"row_offset": 0 if r == 0 else 5.0},
        "rank 1: row_offset=5.0: must be an integer",
    ),
}


def run_bad(name: str, rank: int) -> dict[str, Any]:
    sp, shard, kwargs, words = BAD[name](rank)
    before = shard.clone()
    try:
        sp.add_data("t", shard, **kwargs)
    except ShardError as error:
        message = str(error)
        return {
            "ok": words in message and "\n" not in message,
            "message": message,
            "untouched": bool(torch.equal(shard, before)) and not sp.data_groups,
        }
    return {"ok": False, "message": "no ShardError"}


def run_levels_differ(rank: int) -> dict[str, Any]:
    """A schedule out of step on one rank: the step refuses before any mask changes."""
    sp = ShardedMagnitudeSparsifier(sparsity_level=0.5, timeout_s=60)
    sp.add_data("t", _normal(14, (6, 4)))
    sp.data_groups["t"]["sparsity_level"] = 0.5 if rank == 0 else 0.7
    try:
        sp.step()
    except ShardError as error:
        message = str(error)
        return {
            "ok": "configure 't' differently" in message and "sparsity_level=0.7" in message,
            "message": message,
            "untouched": bool(sp.get_mask("t").all()),
        }
    return {"ok": False, "message": "stepped"}


def main(mode: str, out_dir: str) -> int:
    rank = int(os.environ["RANK"])

    def emit(mode: str, case: str, rank: int, result: dict[str, Any]) -> None:
        line = json.dumps({"mode": mode, "case": case, "rank": rank, **result})
        with open(Path(out_dir) / f"rank{rank}.jsonl", "a") as out:
            out.write(line + "\n")

    if mode == "missing-init" and rank == 1:
        time.sleep(3 * TIMEOUT_S)  # never joins: rank 0 must give up with one clear line
        return 0
    try:
        init_process_group(timeout_s=TIMEOUT_S if mode.startswith("missing") else 60)
    except ShardError as error:
        emit(mode, "init", rank, {"ok": True, "message": str(error)})
        return 3
    if mode == "cuda":
        assert dist.get_backend() == "nccl", dist.get_backend()
        for case in CASES:
            emit(mode, case, rank, run_cuda_case(case))
    elif mode == "cases":
        for case in CASES:
            emit(mode, case, rank, run_case(case, rank))
        emit(mode, "reversed_offsets", rank, run_reversed(rank))
        emit(mode, "pickle_and_state_dict", rank, run_checkpoint(rank))
    elif mode == "bad":
        for case in BAD:
            emit(mode, case, rank, run_bad(case, rank))
        emit(mode, "levels_differ_at_step", rank, run_levels_differ(rank))
        emit(mode, "in_step_after_errors", rank, run_case("data_norm_l1_even", rank))
        # Last, as the group is of no use after it: a rank that is alive but never steps.
        sp = ShardedMagnitudeSparsifier(timeout_s=TIMEOUT_S)
        sp.add_data("t", torch.ones(4, 3))
        if rank == 1:
            time.sleep(3 * TIMEOUT_S)
            return 0
        try:
            sp.step()
        except ShardError as error:
            emit(mode, "never_steps", rank, {"ok": True, "message": str(error)})
            return 0
        emit(mode, "never_steps", rank, {"ok": False, "message": "stepped alone"})
        return 3
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
