"""Exact selection of the ``k`` lowest keys into a :class:`PackedMask`, for data read from disk.

The in-memory selection (:mod:`~sparsify_exp.sparsifier.select`) writes a ``bool`` keep
tensor, a byte an item, and brackets the threshold with a strided sample: one read per
sample point, scattered over the whole data. For memory-mapped data both cost too much: a
byte an entry is a quarter of fp32 data, and scattered reads pull in the file around each
point. Here the keep bits go straight into a :class:`PackedMask` and the sample is read as
a few contiguous stripes, so a step is one sequential pass over the data:

1. keys of :data:`STRIPES` evenly spaced stripes bracket the ``k``-th key ``[low, high]``
   (read with ``madvise(MADV_RANDOM)``, so each stripe costs a page or two, not the
   kernel's read-around of megabytes);
2. one pass writes "kept" for every key above ``high`` and notes the keys inside the
   bracket (with their positions) and the count below it;
3. the ``k``-th key among the noted ones is the threshold; the noted keys above it, and the
   ties past the first ones, are set back to kept.

When the stripes mislead (a sorted or strongly layered table), the candidates overflow or
miss the threshold and the exact histogram narrowing of
:func:`~sparsify_exp.sparsifier.select.find_cuts` takes over (a few more passes). Either
way exactly ``k`` keys are removed, the lowest, ties by position: the in-memory result.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import torch

from sparsify_exp.sparsifier import block_ops
from sparsify_exp.sparsifier.packed_mask import PackedMask
from sparsify_exp.sparsifier.select import (
    Cut,
    DataKeys,
    KeySource,
    _narrow,
    flat_views,
    key_dtype_for,
    magnitude_keys,
)

__all__ = [
    "BlockScoreKeys",
    "EntryKeys",
    "apply_cut_packed",
    "select_packed",
    "write_block_rows",
]

_TRIM_EVERY = 8  # chunks between returns of freed heap pages to the system
STRIPES = 1024  # contiguous stripes read to bracket the threshold
SAMPLE = 1 << 20  # keys in all over the stripes
_MADV_NORMAL, _MADV_RANDOM, _MADV_WILLNEED = 0, 1, 3
_READ_LEAD = 64 << 20  # bytes a pass asks the kernel to read ahead of where it computes
_READ_WINDOW = 8 << 20  # bytes asked for at a time
_PAGE = 4096


def _madvise() -> Any:
    """libc's ``madvise``, or None where there is none."""
    global _MADVISE
    if _MADVISE is False:
        try:
            _MADVISE = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            _MADVISE = None
    return _MADVISE


_MADVISE: Any = False


class ReadAhead:
    """Keeps the disk busy ahead of a pass over a memory-mapped tensor.

    A page fault reads only the few megabytes around it, and the pass waits for each read:
    the disk and the CPU then take turns. Telling the kernel (``madvise(MADV_WILLNEED)``)
    about the bytes :data:`_READ_LEAD` ahead of where the pass computes starts those reads
    early, so they overlap the computing. Does nothing for data not in CPU memory."""

    def __init__(self, tensor: torch.Tensor) -> None:
        usable = tensor.device.type == "cpu" and tensor.numel() > 0 and _madvise() is not None
        self.base = tensor.data_ptr() if usable else 0
        self.end = self.base + tensor.numel() * tensor.element_size() if usable else 0
        self.next = self.base - self.base % _PAGE

    def at(self, offset: int) -> None:
        """The pass reached byte ``offset`` of the tensor."""
        target = min(self.base + offset + _READ_LEAD, self.end)
        while self.next < target:
            _madvise()(ctypes.c_void_p(self.next), ctypes.c_size_t(_READ_WINDOW), _MADV_WILLNEED)
            self.next += _READ_WINDOW


class EntryKeys(DataKeys):
    """``|x|`` keys of every entry (see :class:`DataKeys`), and of a contiguous range; a
    pass reads ahead (:class:`ReadAhead`)."""

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """As :meth:`DataKeys.chunks`, but each chunk a new tensor (it may be used while
        the next one is computed)."""
        ahead = ReadAhead(self.data) if self.data.is_contiguous() else None
        for start, view in flat_views(self.data, self.limit):
            if ahead is not None:
                ahead.at((start + view.numel()) * self.data.element_size())
            yield start, magnitude_keys(view, self.key_dtype, square=self.square)

    def keys_range(self, start: int, stop: int) -> torch.Tensor:
        if self.data.is_contiguous():
            values = self.data.reshape(-1)[start:stop]
            return magnitude_keys(values, self.key_dtype, square=self.square)
        return self.keys_at(torch.arange(start, stop, device=self.device))


class BlockScoreKeys(KeySource):
    """Keys of the block scores of ``data2d``, computed a chunk of block rows at a time with
    exactly the arithmetic of :func:`~sparsify_exp.sparsifier.block_ops.block_scores` (the
    whole grid at once for small data), so they rank as the in-memory step ranks them."""

    def __init__(self, data2d: torch.Tensor, block: tuple[int, int], norm: str) -> None:
        self.data = self.data2d = data2d
        self.block, self.norm = block, norm
        self.height, self.width = data2d.shape
        self.rows, self.cols = block_ops.grid_shape(self.height, self.width, block)
        self.numel = self.rows * self.cols
        self.key_dtype = key_dtype_for(block_ops.work_dtype(data2d.dtype))
        self.device = data2d.device
        small = data2d.numel() <= block_ops.SMALL_ELEMENTS
        self._whole = block_ops.block_scores(data2d, block, norm) if small else None

    def scores(self, start: int, stop: int) -> torch.Tensor:
        """The scores of block rows ``[start, stop)``."""
        if self._whole is not None:
            return self._whole[start:stop]
        block_h, block_w = self.block
        chunk = self.data2d[start * block_h : min(stop * block_h, self.height)]
        scores = block_ops._sum_blocks(block_ops._magnitude(chunk, self.norm), self.block)
        per_block = block_h * block_w
        if self.width % block_w:
            scores[:, -1] *= per_block / (block_h * (self.width % block_w))
        if self.height % block_h and stop == self.rows:
            scores[-1, :] *= per_block / ((self.height % block_h) * block_w)
        return scores

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        contiguous = self.data2d.is_contiguous()
        ahead = ReadAhead(self.data2d) if contiguous and self._whole is None else None
        row_bytes = self.block[0] * self.width * self.data2d.element_size()
        for start, stop in block_ops._row_chunks(self.height, self.width, self.block[0]):
            if ahead is not None:
                ahead.at(start * row_bytes)
            keys = magnitude_keys(self.scores(start, stop).reshape(-1), self.key_dtype)
            yield start * self.cols, keys

    def keys_range(self, start: int, stop: int) -> torch.Tensor:
        first, last = start // self.cols, -(-stop // self.cols)
        scores = self.scores(first, last).reshape(-1)
        offset = first * self.cols
        return magnitude_keys(scores[start - offset : stop - offset], self.key_dtype)

    def keys_at(self, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("block scores are read in ranges (keys_range)")


def _advise(tensor: torch.Tensor, advice: int) -> None:
    """``madvise`` over the tensor's pages (readahead of a memory-mapped file); nothing
    where there is no such call or the data is not in CPU memory."""
    madvise = _madvise()
    if tensor.device.type != "cpu" or tensor.numel() == 0 or madvise is None:
        return
    address = tensor.data_ptr()
    first = address - address % _PAGE
    length = address - first + tensor.numel() * tensor.element_size()
    madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), ctypes.c_int(advice))


def _trim_heap() -> None:
    """Returns the free pages inside the C heap to the system (glibc's ``malloc_trim``).

    A pass allocates chunk-sized temporaries and keeps small candidate tensors between them;
    the heap then fragments, and its free holes would stay resident: over a whole table,
    more than the data itself. Nothing where the call does not exist."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _stripe_sample(source: EntryKeys | BlockScoreKeys) -> torch.Tensor:
    """Keys of :data:`STRIPES` evenly spaced contiguous ranges (all keys when few), sorted."""
    n = source.numel
    if n <= SAMPLE:
        parts = [keys.clone() for _, keys in source.chunks()]
    else:
        per = SAMPLE // STRIPES
        starts = [i * (n - per) // (STRIPES - 1) for i in range(STRIPES)]
        _advise(source.data, _MADV_RANDOM)
        try:
            parts = [source.keys_range(s, s + per) for s in starts]
        finally:
            _advise(source.data, _MADV_NORMAL)
    return torch.sort(torch.cat(parts).cpu()).values


def _bracket(sample: torch.Tensor, n: int, k: int, top: int) -> tuple[int, int]:
    """``[low, high]`` that the sorted ``sample`` says holds the ``k``-th of ``n`` keys."""
    m = sample.numel()
    if m == n:  # every key: the bracket is the threshold itself
        kth = int(sample[k - 1])
        return kth, kth
    position = k / n * m
    # the rank's deviation is at most sqrt(m) / 2 for a uniform sample: 8 of them either
    # side, as the stripes' entries are not independent (rows of one scale)
    spread = 4.0 * math.sqrt(m) + 2
    lo_index, hi_index = math.floor(position - spread), math.ceil(position + spread)
    low = int(sample[lo_index]) if lo_index >= 0 else 0
    high = int(sample[hi_index]) if hi_index < m else top
    return low, high


def select_packed(
    source: KeySource,
    k: int,
    out: PackedMask,
    bracket: tuple[int, int] | None = None,
) -> None:
    """Writes ``out`` (flat, ``source.numel`` entries) with exactly the ``k`` lowest keys
    removed (ties by position), in one pass when ``bracket`` (default: a stripe sample of
    ``source``, which then needs ``keys_range``) holds the ``k``-th key."""
    n = source.numel
    if k <= 0 or k >= n:
        out.fill_(k <= 0)
        return
    top = torch.iinfo(source.key_dtype).max
    if bracket is None:
        bracket = _bracket(_stripe_sample(source), n, k, top)  # type: ignore[arg-type]
    low, high = bracket
    cap = max(1 << 20, n // 64)  # candidates held at most: 8 bytes each, 1/8 byte an item
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    below, held = 0, 0
    found: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    chunks = source.chunks()
    if isinstance(source, (EntryKeys, BlockScoreKeys)) and n > SAMPLE:
        chunks = _prefetched(chunks)  # their chunks are new tensors: safe to compute ahead
    for count, (start, keys) in enumerate(chunks):
        if count % _TRIM_EVERY == _TRIM_EVERY - 1:
            _trim_heap()
        keep = torch.gt(keys, high)  # provisional: everything up to `high` is removed
        out.write(start, keep)
        if low > 0:
            at_least = torch.ge(keys, low)
            below += keys.numel() - int(torch.count_nonzero(at_least))
            inside = at_least.logical_xor_(keep)  # keep implies at_least
        else:
            inside = keep.logical_not_()
        index = inside.nonzero().squeeze(1)
        held += index.numel()
        if held > cap:
            break
        found.append((start, index.to(index_dtype), keys[index]))
    else:
        if below < k <= below + held:
            _settle(found, k - below, out)
            return
    del found
    (cut,) = _narrow([source], k, cap, source.key_dtype)
    apply_cut_packed(source, cut, out)


T = TypeVar("T")


def _prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """``items`` computed up to ``depth`` ahead in a thread: the next chunk's reads and keys
    overlap this chunk's selection (torch ops release the GIL), on a second core where there
    is one. Stopping early stops the thread; its errors are raised here."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: object) -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                ready.put(item, timeout=0.05)
                return

    def produce() -> None:
        try:
            for item in items:
                put(item)
                if stop.is_set():
                    return
            put(end)
        except BaseException as error:  # raised in the consumer
            put(error)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _settle(found: list[tuple[int, torch.Tensor, torch.Tensor]], rank: int, out: PackedMask):
    """Puts back the candidates above the ``rank``-th, and the ties past the first ones."""
    candidates = torch.cat([values for _, _, values in found])
    threshold = int(torch.kthvalue(candidates.cpu(), rank).values)
    take = rank - int(torch.count_nonzero(candidates < threshold))
    del candidates
    seen = 0  # ties met so far: the first `take` stay removed
    for start, index, values in found:
        restore = values > threshold
        ties = (values == threshold).nonzero().squeeze(1)
        restore[ties[max(take - seen, 0) :]] = True
        seen += ties.numel()
        out.set_kept(index[restore].long() + start)


def apply_cut_packed(source: KeySource, cut: Cut, out: PackedMask) -> None:
    """``out`` (flat) for ``cut``: :func:`~sparsify_exp.sparsifier.select.apply_cut` into
    packed bits, a chunk at a time."""
    if cut.removes_all or cut.keeps_all:
        out.fill_(cut.keeps_all)
        return
    seen = 0
    for start, keys in source.chunks():
        if cut.take == 0:
            out.write(start, torch.ge(keys, cut.key))
            continue
        keep = torch.gt(keys, cut.key)
        if cut.take < cut.ties and seen < cut.ties:  # some ties are kept: the later ones
            positions = (keys == cut.key).nonzero().squeeze(1)
            keep[positions[max(cut.take - seen, 0) :]] = True
            seen += positions.numel()
        out.write(start, keep)


def write_block_rows(
    out: PackedMask,
    data2d: torch.Tensor,
    grid: PackedMask,
    block: tuple[int, int],
    zeros: int,
    norm: str,
) -> None:
    """``out`` (the data's mask) from ``grid`` (kept blocks), a chunk of block rows at a
    time: whole blocks, or the ``zeros`` smallest entries of each removed block (which
    reads the data again)."""
    height, width = data2d.shape
    whole = zeros == block[0] * block[1]
    flat = out.reshape(-1)
    for start, stop in block_ops._row_chunks(height, width, block[0]):
        keep = grid[start:stop]
        first, last = start * block[0], min(stop * block[0], height)
        chunk = torch.empty(last - first, width, dtype=torch.bool, device=out.device)
        if whole:
            block_ops.write_block_mask(chunk, keep, block)
        else:
            removed = keep.logical_not_()
            block_ops.write_in_block_mask(chunk, data2d[first:last], removed, block, zeros, norm)
        flat.write(first * width, chunk.view(-1))
