"""The ``k`` lowest keys of data sharded across processes, found with counts alone.

Each process holds its shards' :class:`~sparsify_exp.sparsifier.select.KeySource`\\ s; the
items of all of them, laid in a global order (source by source, and inside a source shard by
shard), are ranked together as :func:`~sparsify_exp.sparsifier.select.find_cuts` ranks them
in one process: keys ascending, ties by global position. What crosses processes is a strided
sample of keys (to bracket the threshold), histograms of counts (4096 buckets a pass, each
pass narrowing the key range 4096-fold until one key is left) and, at the end, each shard's
count below the threshold and of ties at it. The data never moves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from sparsify_exp.sparsifier.select import SAMPLE_SIZE, SMALL_KEYS, Cut, KeySource

__all__ = ["find_sharded_cuts"]

_HIST_BITS = 12


def comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where collective tensors live: the current GPU for nccl, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def find_sharded_cuts(
    sources: Sequence[KeySource],
    k: int,
    total: int,
    offsets: Sequence[int],
    group: dist.ProcessGroup | None = None,
) -> list[Cut]:
    """This process's :class:`Cut` of each of its ``sources`` such that exactly ``k`` items
    are removed over every process: the ``k`` lowest keys of the ``total`` items, ties first by
    global position.

    ``offsets[i]`` is the global position of ``sources[i]``'s first item. Every process calls
    this with the same ``k``, ``total`` and number of sources, whose key dtype agrees.
    """
    key_dtype = sources[0].key_dtype if sources else torch.int32
    if k <= 0:
        return [Cut.keep_all(key_dtype) for _ in sources]
    if k >= total:
        return [Cut.remove_all(key_dtype) for _ in sources]
    device = comm_device(group)
    top = torch.iinfo(key_dtype).max
    low, high = (0, top) if total <= SMALL_KEYS else _bracket(sources, total, k, offsets, group)
    bracketed = (low, high) != (0, top)
    while True:
        width = high - low + 1
        shift = max(0, (width - 1).bit_length() - _HIST_BITS)
        buckets = ((high - low) >> shift) + 1
        local = [_histogram(source, low, high, shift, buckets) for source in sources]
        summed = torch.zeros(buckets + 1, dtype=torch.int64)
        for below, hist in local:
            summed[0] += below
            summed[1:] += hist
        summed = summed.to(device)
        dist.all_reduce(summed, group=group)
        summed = summed.cpu()
        below_all, hist_all = int(summed[0]), summed[1:]
        rank = k - below_all
        if not 0 < rank <= int(hist_all.sum()):
            if not bracketed:  # impossible: the full range holds every key
                raise RuntimeError("sharded selection lost count of the keys")
            low, high, bracketed = 0, top, False  # the sample misled: the full range
            continue
        cumulative = hist_all.cumsum(0)
        bucket = int(torch.searchsorted(cumulative, torch.tensor(rank)))
        if shift == 0:
            below = [b + int(h[:bucket].sum()) for b, h in local]
            ties = [int(h[bucket]) for _, h in local]
            return _distribute(low + bucket, below, ties, k, offsets, key_dtype, group)
        low = low + (bucket << shift)
        high = min(high, low + (1 << shift) - 1)


def _histogram(
    source: KeySource, low: int, high: int, shift: int, buckets: int
) -> tuple[int, torch.Tensor]:
    """``(count of keys below low, counts of keys in [low, high] by bucket)``, one pass."""
    below = 0
    hist = torch.zeros(buckets, dtype=torch.int64)
    if source.numel == 0:
        return below, hist
    for _, keys in source.chunks():
        if low > 0:
            below += int(torch.count_nonzero(keys < low))
        inside = keys[(keys >= low).logical_and_(keys <= high)]
        index = (inside.long() - low) >> shift
        hist += torch.bincount(index, minlength=buckets).cpu()
    return below, hist


def _bracket(
    sources: Sequence[KeySource],
    total: int,
    k: int,
    offsets: Sequence[int],
    group: dist.ProcessGroup | None,
) -> tuple[int, int]:
    """``[low, high]`` holding the k-th key by a strided sample of every process's keys (the
    positions ``0, step, 2 step...`` of the global order, each taken by its holder)."""
    step = max(1, total // SAMPLE_SIZE)
    parts = []
    for source, offset in zip(sources, offsets, strict=True):
        first = (-offset) % step
        if first < source.numel:
            positions = torch.arange(
                first, source.numel, step, dtype=torch.int64, device=source.device
            )
            parts.append(source.keys_at(positions).long().cpu())
    mine = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    sample = torch.sort(_gather_varying(mine, group)).values
    m = sample.numel()
    top = torch.iinfo(sources[0].key_dtype).max if sources else torch.iinfo(torch.int32).max
    if m == 0:
        return 0, top
    position = k / total * m
    spread = 3.0 * m**0.5 + 2
    lo_index, hi_index = int(position - spread) - 1, int(position + spread) + 1
    low = int(sample[lo_index]) if lo_index >= 0 else 0
    high = int(sample[hi_index]) if hi_index < m else top
    return low, high


def _gather_varying(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every process's 1-D int64 ``tensor`` (of any length), concatenated in rank order."""
    device = comm_device(group)
    size = torch.tensor([tensor.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.int64, device=device)
    padded[: tensor.numel()] = tensor.to(device)
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[: int(s)].cpu() for g, s in zip(gathered, sizes, strict=True)])


def _distribute(
    threshold: int,
    below: list[int],
    ties: list[int],
    k: int,
    offsets: Sequence[int],
    key_dtype: torch.dtype,
    group: dist.ProcessGroup | None,
) -> list[Cut]:
    """Ties at ``threshold`` go to the first global positions first, over every process:
    each process learns every shard's counts (three integers a shard) and takes its part."""
    device = comm_device(group)
    rows = torch.tensor(
        [[o, b, t] for o, b, t in zip(offsets, below, ties, strict=True)], dtype=torch.int64
    ).reshape(-1, 3)
    everyone = _gather_rows(rows.to(device), group)
    remaining = k - int(everyone[:, 1].sum())
    order = torch.argsort(everyone[:, 0], stable=True)
    take_at: dict[int, int] = {}
    for index in order.tolist():
        offset, _, tie_count = (int(v) for v in everyone[index])
        if tie_count:  # an empty shard may share its offset with the next one
            take = min(tie_count, max(remaining, 0))
            remaining -= take
            take_at[offset] = take
    return [
        Cut(threshold, t, take_at[o] if t else 0, key_dtype)
        for o, t in zip(offsets, ties, strict=True)
    ]


def _gather_rows(rows: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every process's ``(n, 3)`` int64 rows (``n`` may differ), stacked, on the CPU."""
    flat = _gather_varying(rows.reshape(-1).cpu(), group)
    return flat.reshape(-1, 3)
