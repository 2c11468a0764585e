"""Exact selection of the ``k`` lowest-ranked entries of one or many named data, read in chunks.

Sparsifiers that remove "the ``k`` smallest" (entries, blocks, random keys) share this module.
It never holds more than a chunk of keys plus a few percent of candidates, so it can rank all
the tables of a model at once (``scope="global"``) without concatenating them.

**Keys.** Every ranked item has an integer key ordered as what it stands for. A magnitude
(``|x|``, a block score: ``>= 0``, ``+inf`` or NaN) maps to the bits of its float with the sign
cleared -- non-negative floats order as their bits do -- and every NaN to one key just above
``+inf``'s. So finite values rank first, then ``+inf``, then NaN, as ``torch.sort`` orders
them, and NaNs tie with each other. int32 keys for float32 magnitudes (fp16, bf16, fp32 and
complex64 data), int64 for float64 ones.

**Cuts.** The ``k`` removed items are those with key below a threshold ``t`` plus the first
few (by position, then by the order of the sources) whose key equals ``t``: ties never make
the count differ from ``k``. :func:`find_cuts` finds ``t`` in one pass when a strided sample
brackets it (the usual case: the candidates inside the bracket are a few percent of the
items), otherwise by histogram narrowing over the key range (a few passes, bounded memory).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from sparsify_exp.sparsifier.block_ops import CHUNK_ELEMENTS

__all__ = [
    "Cut",
    "DataKeys",
    "KeySource",
    "apply_cut",
    "find_cuts",
    "flat_views",
    "key_dtype_for",
    "magnitude_keys",
    "select_and_write",
]

SAMPLE_SIZE = 1 << 17  # keys read to bracket the threshold
SMALL_KEYS = 1 << 18  # up to this many keys in all: collect them all, no sample
_HIST_BITS = 12  # histogram narrowing: 4096 buckets a pass

_WORK = {torch.int32: torch.float32, torch.int64: torch.float64}
_SIGN_CLEAR = {torch.int32: 0x7FFF_FFFF, torch.int64: 0x7FFF_FFFF_FFFF_FFFF}
NAN_KEY = {torch.int32: 0x7F80_0001, torch.int64: 0x7FF0_0000_0000_0001}


def key_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """int64 keys for float64/complex128 data, int32 for everything else."""
    return torch.int64 if dtype in (torch.float64, torch.complex128) else torch.int32


def common_key_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The key dtype that ranks all of ``dtypes`` together (int64 if any needs it)."""
    return torch.int64 if any(key_dtype_for(d) == torch.int64 for d in dtypes) else torch.int32


def magnitude_keys(
    values: torch.Tensor,
    key_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    square: bool = False,
) -> torch.Tensor:
    """Keys of ``|values|`` (``|values|**2`` with ``square``, in the work dtype) of any shape
    and strides, 1-D, in ``out`` (1-D, at least as long) when given: NaN ranks above
    ``+inf``, all NaNs equal; ``-0.0`` equals ``0.0``."""
    n = values.numel()
    work = _WORK[key_dtype]
    if values.is_complex():
        values = values.abs()  # C99's cabs: an infinite part gives +inf, even beside NaN
    keys = out[:n] if out is not None else torch.empty(n, dtype=key_dtype, device=values.device)
    shaped = keys.view(values.shape)
    if values.dtype == work and not square:
        torch.bitwise_and(values.view(key_dtype), _SIGN_CLEAR[key_dtype], out=shaped)
    else:  # a cast into the buffer (fp16, bf16, ints, fp32 ranked as fp64), then the bits
        magnitudes = shaped.view(work)
        magnitudes.copy_(values)
        if square:
            magnitudes.square_()
        keys.bitwise_and_(_SIGN_CLEAR[key_dtype])
    return keys.clamp_(max=NAN_KEY[key_dtype])


def flat_views(tensor: torch.Tensor, limit: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, view)`` pairs: views of ``tensor`` of at most ``limit`` entries (at least one
    row of the innermost dim they split) whose row-major flattening covers
    ``[start, start + view.numel())`` of the tensor's; no copies, whatever the strides."""
    if tensor.dim() == 0:
        yield 0, tensor.reshape(1)
        return
    n = tensor.numel()
    if n == 0:
        return
    if tensor.is_contiguous():
        flat = tensor.view(-1)
        for start in range(0, n, limit):
            yield start, flat[start : start + limit]
        return
    yield from _strided_views(tensor, limit, 0)


def _strided_views(
    tensor: torch.Tensor, limit: int, offset: int
) -> Iterator[tuple[int, torch.Tensor]]:
    row = tensor[0].numel() if tensor.dim() > 1 else 1
    if row <= limit or tensor.dim() == 1:
        step = max(1, limit // row)
        for index in range(0, tensor.shape[0], step):
            yield offset + index * row, tensor[index : index + step]
    else:
        for index in range(tensor.shape[0]):
            yield from _strided_views(tensor[index], limit, offset + index * row)


class KeySource(abc.ABC):
    """The keys of one name's ranked items (entries, blocks...), in position order."""

    numel: int
    key_dtype: torch.dtype
    device: torch.device

    @abc.abstractmethod
    def keys_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Keys of the items at flat ``positions`` (int64, on ``device``)."""

    @abc.abstractmethod
    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, keys)``: 1-D key chunks covering ``[0, numel)`` in order. A chunk may be
        a buffer reused by the next one: use it before asking for the next."""


class DataKeys(KeySource):
    """``|x|`` (``|x|**2`` with ``square``) of every entry of ``data``, in row-major order
    (any strides)."""

    def __init__(
        self,
        data: torch.Tensor,
        key_dtype: torch.dtype,
        limit: int = CHUNK_ELEMENTS,
        square: bool = False,
    ):
        self.data = data
        self.numel = data.numel()
        self.key_dtype = key_dtype
        self.device = data.device
        self.limit = limit
        self.square = square

    def keys_at(self, positions: torch.Tensor) -> torch.Tensor:
        data = self.data
        if data.is_contiguous():
            values = data.reshape(-1)[positions]
        else:
            values = data[torch.unravel_index(positions, data.shape)]
        return magnitude_keys(values, self.key_dtype, square=self.square)

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        size = min(self.limit, self.numel)
        buffer = torch.empty(size, dtype=self.key_dtype, device=self.device)
        for start, view in flat_views(self.data, self.limit):
            yield start, magnitude_keys(view, self.key_dtype, out=buffer, square=self.square)


@dataclass(frozen=True)
class Cut:
    """Which items of one source are removed: every item whose key is below ``key``, and the
    first ``take`` (by position) of the ``ties`` items whose key equals it. ``key=None``
    removes everything; ``key=-1`` nothing (keys are never negative)."""

    key: int | None
    ties: int = 0
    take: int = 0
    key_dtype: torch.dtype = torch.int32

    @classmethod
    def keep_all(cls, key_dtype: torch.dtype = torch.int32) -> Cut:
        return cls(-1, 0, 0, key_dtype)

    @classmethod
    def remove_all(cls, key_dtype: torch.dtype = torch.int32) -> Cut:
        return cls(None, 0, 0, key_dtype)

    @property
    def keeps_all(self) -> bool:
        return self.key is not None and self.key < 0

    @property
    def removes_all(self) -> bool:
        return self.key is None


def _check_dtype(sources: Sequence[KeySource]) -> torch.dtype:
    dtypes = {s.key_dtype for s in sources}
    if len(dtypes) != 1:
        raise ValueError(f"sources rank with different key dtypes: {sorted(map(str, dtypes))}")
    return dtypes.pop()


def find_cuts(sources: Sequence[KeySource], k: int) -> list[Cut]:
    """One :class:`Cut` a source such that exactly ``k`` items are removed in all: the ``k``
    lowest keys over every source together, ties by source order then position."""
    key_dtype = _check_dtype(sources)
    total = sum(s.numel for s in sources)
    if k <= 0:
        return [Cut.keep_all(key_dtype) for _ in sources]
    if k >= total:
        return [Cut.remove_all(key_dtype) for _ in sources]
    top = torch.iinfo(key_dtype).max
    cap = max(1 << 20, total // 16)  # candidates held at most (a few % of the data)
    if total <= SMALL_KEYS:
        found = _collect(sources, 0, top, cap=total)
        assert found is not None
        return _finish(found, k, key_dtype)
    low, high = _bracket(sources, total, k, top)
    found = _collect(sources, low, high, cap)
    if found is not None and found.below_total < k <= found.below_total + found.inside:
        return _finish(found, k, key_dtype)
    return _narrow(sources, k, cap, key_dtype)


def _sample(sources: Sequence[KeySource], total: int) -> torch.Tensor:
    """Keys at every ``step``-th position of the sources laid end to end, on the CPU."""
    step = max(1, total // SAMPLE_SIZE)
    parts, offset = [], 0
    for source in sources:
        first = (-offset) % step
        if first < source.numel:
            positions = torch.arange(
                first, source.numel, step, dtype=torch.int64, device=source.device
            )
            parts.append(source.keys_at(positions).cpu())
        offset += source.numel
    return torch.cat(parts)


def _bracket(sources: Sequence[KeySource], total: int, k: int, top: int) -> tuple[int, int]:
    """``[low, high]`` (inclusive) that the sample says holds the k-th key."""
    sample = torch.sort(_sample(sources, total)).values
    m = sample.numel()
    position = k / total * m
    # the k-th key's rank in the sample has a standard deviation of at most sqrt(m) / 2:
    # 6 of them either side (a miss only costs the exact fallback); the bracket holds about
    # 6 / sqrt(m), 1.7 %, of the keys
    spread = 3.0 * math.sqrt(m) + 2
    lo_index, hi_index = math.floor(position - spread), math.ceil(position + spread)
    low = int(sample[lo_index]) if lo_index >= 0 else 0
    high = int(sample[hi_index]) if hi_index < m else top
    return low, high


@dataclass
class _Found:
    """The keys in ``[low, high]`` of each source, and how many lie below ``low``."""

    low: int
    high: int
    below: list[int]
    values: list[torch.Tensor | None]  # None when low == high: only the count matters
    counts: list[int]

    @property
    def below_total(self) -> int:
        return sum(self.below)

    @property
    def inside(self) -> int:
        return sum(self.counts)


def _collect(sources: Sequence[KeySource], low: int, high: int, cap: int) -> _Found | None:
    """One pass: per source, the count below ``low`` and the keys in ``[low, high]``; None as
    soon as more than ``cap`` keys are inside (and ``low < high``)."""
    top = torch.iinfo(sources[0].key_dtype).max
    found = _Found(low, high, [], [], [])
    held = 0
    for source in sources:
        below, count, parts = 0, 0, []
        scratch = _Scratch()
        for _, keys in source.chunks():
            inside = scratch.get(keys, 0)
            if low > 0:
                torch.lt(keys, low, out=inside)
                below += int(torch.count_nonzero(inside))
                if high < top:
                    inside.logical_not_().logical_and_(
                        torch.le(keys, high, out=scratch.get(keys, 1))
                    )
                else:
                    inside.logical_not_()
            elif high < top:
                torch.le(keys, high, out=inside)
            else:
                inside.fill_(True)
            if low == high:
                count += int(torch.count_nonzero(inside))
                continue
            values = keys[inside]
            count += values.numel()
            held += values.numel()
            if held > cap:
                return None
            parts.append(values)
        found.below.append(below)
        found.counts.append(count)
        if low == high:
            found.values.append(None)
        else:
            device = source.device
            empty = torch.empty(0, dtype=source.key_dtype, device=device)
            found.values.append(torch.cat(parts) if parts else empty)
    return found


class _Scratch:
    """Reusable ``bool`` chunks: a fresh chunk-size tensor each time costs more than the
    comparison that fills it."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}

    def get(self, like: torch.Tensor, slot: int) -> torch.Tensor:
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < like.numel() or buffer.device != like.device:
            buffer = torch.empty(like.numel(), dtype=torch.bool, device=like.device)
            self.buffers[slot] = buffer
        return buffer[: like.numel()]


def _finish(found: _Found, k: int, key_dtype: torch.dtype) -> list[Cut]:
    """The cuts, once ``found`` holds the k-th key among its candidates."""
    rank = k - found.below_total
    if found.low == found.high:
        threshold = found.low
        below = list(found.below)
        ties = list(found.counts)
    else:
        candidates = torch.cat([v.cpu() for v in found.values if v is not None])
        threshold = int(torch.kthvalue(candidates, rank).values)
        below, ties = [], []
        for base, values in zip(found.below, found.values, strict=True):
            below.append(base + int(torch.count_nonzero(values < threshold)))
            ties.append(int(torch.count_nonzero(values == threshold)))
    return _distribute(threshold, below, ties, k, key_dtype)


def _distribute(
    threshold: int, below: list[int], ties: list[int], k: int, key_dtype: torch.dtype
) -> list[Cut]:
    """Ties at the threshold go to the first sources first, the first positions first."""
    remaining = k - sum(below)
    cuts = []
    for tie_count in ties:
        take = min(tie_count, max(remaining, 0))
        remaining -= take
        cuts.append(Cut(threshold, tie_count, take, key_dtype))
    return cuts


def _narrow(sources: Sequence[KeySource], k: int, cap: int, key_dtype: torch.dtype) -> list[Cut]:
    """Exact when the sample misled: each pass histograms the keys of the current range into
    4096 buckets and keeps the bucket holding the k-th key, until one key or a range of at
    most ``cap`` keys is left (then collected)."""
    low, high = 0, torch.iinfo(key_dtype).max
    below = [0] * len(sources)
    rank = k
    top = high
    while True:
        width = high - low + 1
        shift = max(0, (width - 1).bit_length() - _HIST_BITS)
        buckets = ((high - low) >> shift) + 1
        hists = []
        for source in sources:
            hist = torch.zeros(buckets, dtype=torch.int64)
            for _, keys in source.chunks():
                if low > 0 or high < top:
                    keys = keys[(keys >= low).logical_and_(keys <= high)]
                index = (keys.long() - low) >> shift
                hist += torch.bincount(index, minlength=buckets).cpu()
            hists.append(hist)
        total = torch.stack(hists).sum(0)
        cumulative = total.cumsum(0)
        bucket = int(torch.searchsorted(cumulative, torch.tensor(rank)))
        before = int(cumulative[bucket - 1]) if bucket else 0
        rank -= before
        below = [b + int(h[:bucket].sum()) for b, h in zip(below, hists, strict=True)]
        low = low + (bucket << shift)
        high = min(high, low + (1 << shift) - 1)
        if shift == 0:
            ties = [int(h[bucket]) for h in hists]
            return _distribute(low, below, ties, k, key_dtype)
        if int(total[bucket]) <= cap:
            found = _collect(sources, low, high, cap=int(total[bucket]))
            assert found is not None
            found.below = below
            return _finish(found, k, key_dtype)


def apply_cut(source: KeySource, cut: Cut, keep: torch.Tensor) -> None:
    """Writes ``keep`` (1-D ``bool``, ``source.numel`` long, contiguous) for ``cut``: False
    where an item is removed. Reads the source once (plus a tie pass when some are kept)."""
    if cut.removes_all:
        keep.fill_(False)
        return
    if cut.keeps_all:
        keep.fill_(True)
        return
    threshold = cut.key
    seen = 0
    for start, keys in source.chunks():
        out = keep[start : start + keys.numel()]
        if cut.take == 0:
            torch.ge(keys, threshold, out=out)
            continue
        torch.gt(keys, threshold, out=out)
        if cut.take < cut.ties and seen < cut.ties:  # some ties are kept: the later ones
            positions = (keys == threshold).nonzero().squeeze(1)
            skip = max(cut.take - seen, 0)
            out[positions[skip:]] = True
            seen += positions.numel()


def select_and_write(
    source: KeySource,
    k: int,
    keep: torch.Tensor,
    bracket: tuple[int, int] | None = None,
) -> None:
    """Writes ``keep`` (1-D contiguous ``bool``) with exactly the ``k`` lowest keys removed,
    reading the source once when ``bracket`` (or a sample) holds the k-th key: the pass
    removes everything up to the bracket's top, notes the few keys inside it with their
    positions, and puts back those above the threshold. For sources whose keys cost more
    to compute than to compare (random keys)."""
    n = source.numel
    if k <= 0:
        keep.fill_(True)
        return
    if k >= n:
        keep.fill_(False)
        return
    top = torch.iinfo(source.key_dtype).max
    if bracket is None:
        bracket = _bracket([source], n, k, top) if n > SMALL_KEYS else (0, top)
    low, high = bracket
    cap = max(1 << 20, n // 16)
    below, held = 0, 0
    values, positions = [], []
    scratch = _Scratch()
    for start, keys in source.chunks():
        out = keep[start : start + keys.numel()]
        torch.gt(keys, high, out=out)  # provisional: everything up to `high` is removed
        outside = torch.lt(keys, low, out=scratch.get(keys, 0))
        below += int(torch.count_nonzero(outside))
        outside.logical_or_(out)
        index = outside.logical_not_().nonzero().squeeze(1)
        held += index.numel()
        if held > cap:
            break
        values.append(keys[index])
        positions.append(index + start)
    else:
        inside = sum(v.numel() for v in values)
        if below < k <= below + inside:
            candidates = torch.cat(values).cpu()
            threshold = int(torch.kthvalue(candidates, k - below).values)
            take = k - below - int(torch.count_nonzero(candidates < threshold))
            del candidates
            seen = 0  # ties met so far: the first `take` stay removed, the others return
            for chunk_values, chunk_positions in zip(values, positions, strict=True):
                restore = chunk_values > threshold
                ties = (chunk_values == threshold).nonzero().squeeze(1)
                restore[ties[max(take - seen, 0) :]] = True
                seen += ties.numel()
                keep[chunk_positions[restore]] = True
            return
    (cut,) = find_cuts([source], k)
    apply_cut(source, cut, keep)
