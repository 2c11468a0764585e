"""``data=sharded``: each ``torchrun`` process reads its rows of the tables of a checkpoint.

Launched as ``torchrun --nproc-per-node N -m sparsify_exp data=sharded data.path=...
sparsifier=sharded_data_norm``: rank ``r`` reads rows ``[r * per, (r + 1) * per)`` of every
selected tensor (``per``: the rows divided evenly, rounded up to ``row_align``, the block's
rows by default, so no block straddles two processes) straight from the ``.safetensors`` file,
without loading the rest. The sharded sparsifier finds each table's threshold over all the
shards, so the union of the shards' masks is the single-process mask of the file.

Each rank writes its rows (and rank 0 the tensors left dense) to its own
``sparsified.safetensors``; the header's ``sparsify.shards`` says which rows each holds.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, Field, validate_call

from sparsify_exp.runner.data import DataBundle, select_names
from sparsify_exp.runner.data.file import list_names

#: Whether this source gives nn.Embedding / nn.EmbeddingBag tables (output.quantize).
EMBEDDING_TABLES = False
MODEL = False  # no nn.Module to run calibration inputs through

SHARDED_TARGETS = {
    "sparsify_exp.ShardedDataNormSparsifier",
    "sparsify_exp.ShardedMagnitudeSparsifier",
    "sparsify_exp.sparsifier.ShardedDataNormSparsifier",
    "sparsify_exp.sparsifier.ShardedMagnitudeSparsifier",
    "sparsify_exp.sparsifier.sharded.ShardedDataNormSparsifier",
    "sparsify_exp.sparsifier.sharded.ShardedMagnitudeSparsifier",
}


def _safetensors(path: str) -> str:
    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        raise ValueError(
            "must be a .safetensors file (its rows are read without loading the rest); "
            "convert a torch checkpoint with safetensors.torch.save_file"
        )
    if not p.is_file():
        raise ValueError(f"no such file ({p if p.is_absolute() else Path.cwd() / p})")
    return path


def _steps_shards_together(target: str) -> str:
    if target not in SHARDED_TARGETS:
        raise ValueError(
            "data=sharded needs a sparsifier that steps the shards together: "
            "sparsifier=sharded_data_norm or sparsifier=sharded_magnitude (any other would "
            "sparsify each shard alone)"
        )
    return target


def shard_rows(rows: int, rank: int, world: int, align: int) -> tuple[int, int]:
    """Rank ``rank``'s rows of a table of ``rows``: even parts, each a multiple of ``align``
    rows (the last part takes what is left; late ranks may get none)."""
    per = math.ceil(math.ceil(rows / world) / align) * align
    return min(rank * per, rows), min((rank + 1) * per, rows)


@validate_call
def build(
    path: Annotated[str, AfterValidator(_safetensors)],
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    row_align: Annotated[int, Field(ge=1)] = 1,
    backend: Literal["auto", "gloo", "nccl"] = "auto",
    timeout_s: Annotated[float, Field(gt=0)] = 300.0,
    sparsifier_target: Annotated[str, AfterValidator(_steps_shards_together)] = "",
) -> DataBundle:
    """This process's rows of the floating tensors ``include`` / ``exclude`` select."""
    from safetensors import safe_open

    from sparsify_exp.sparsifier.sharded import init_process_group

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "data=sharded runs one process a shard: launch it with torchrun, e.g. "
            "torchrun --nproc-per-node 2 -m sparsify_exp data=sharded data.path=..."
        )
    init_process_group(None if backend == "auto" else backend, timeout_s=timeout_s)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    p = Path(path).expanduser()
    candidates = list_names(p)
    chosen = select_names(candidates, include, exclude)
    if not chosen:
        raise ValueError(
            f"data.include={list(include or [])} / data.exclude={list(exclude or [])}: no "
            f"floating tensor of {p} selected (available: {', '.join(candidates[:20])})"
        )
    named: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    spans: dict[str, list[int]] = {}
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata() or {})
        for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            if name in chosen:
                piece = f.get_slice(name)
                rows = int(piece.get_shape()[0])
                start, stop = shard_rows(rows, rank, world, row_align)
                named[name] = piece[start:stop]
                spans[name] = [start, stop, rows]
            elif rank == 0:  # the dense rest is written once
                extra[name] = f.get_tensor(name)
    meta["sparsify.shards"] = json.dumps(spans)
    meta["sparsify.rank"] = str(rank)
    meta["sparsify.world_size"] = str(world)
    return DataBundle(
        named_data=named,
        format="safetensors",
        source=f"{p} (rank {rank} of {world})",
        extra_tensors=extra,
        metadata=meta,
    )


def names(
    path: str, include: list[str] | None = None, exclude: list[str] | None = None, **_: Any
) -> list[str]:
    """The names :func:`build` selects, from the file's header (for validation)."""
    return select_names(list_names(Path(path).expanduser()), include, exclude)
