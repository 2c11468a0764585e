"""Block-wise kernels for norm-based masks, written to touch the data once, in chunks.

Data is viewed as 2-D ``(H, W)`` and tiled by ``(bh, bw)`` blocks anchored at index 0; the
last block row/column may be partial. Every function works on ``ceil(H/bh) x ceil(W/bw)``
block grids and allocates at most one chunk of the data at a time.

Ranking order, the one ``torch.sort`` gives (and so torch's reference): finite scores
ascending, then ``+inf``, then NaN; equal scores (NaN included) by position. Complex data is
ranked by magnitude, ``torch.abs`` (C99's ``cabs``: an infinite part makes it ``+inf``, even
beside a NaN part).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.nn import functional as F

# elements of the data processed per chunk: bounds temporaries to a few MB
CHUNK_ELEMENTS = 1 << 20
# below this many elements a step is dominated by per-op overhead: use the fewest ops
SMALL_ELEMENTS = 1 << 16


def as_2d(data: torch.Tensor) -> torch.Tensor:
    """The 2-D view the block grid is laid on, as torch's reference does it.

    Size-1 dimensions are dropped; 1-D data becomes one row; data of more than two
    dimensions (e.g. convolution weights) is flattened to ``(shape[0], -1)``.
    """
    squeezed = data.squeeze()
    if squeezed.dim() == 0:
        return squeezed.reshape(1, 1)
    if squeezed.dim() == 1:
        return squeezed.reshape(1, -1)
    if squeezed.dim() == 2:
        return squeezed
    return squeezed.reshape(squeezed.shape[0], -1)


def grid_shape(height: int, width: int, block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(height / block[0]), math.ceil(width / block[1])


def _row_chunks(height: int, width: int, block_h: int) -> Iterator[tuple[int, int]]:
    """Ranges of block rows ``[start, stop)`` whose data fits in one chunk."""
    block_rows = math.ceil(height / block_h)
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, width * block_h))
    for start in range(0, block_rows, per_chunk):
        yield start, min(start + per_chunk, block_rows)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype scores are computed in: float64 for 64-bit floats, float32 otherwise
    (fp16/bf16 sums would lose the order of close blocks)."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def _magnitude(chunk: torch.Tensor, norm: str) -> torch.Tensor:
    """``|x|`` (L1) or ``|x|**2`` (L2) in the work dtype; a fresh tensor, never a view."""
    work = work_dtype(chunk.dtype)
    if chunk.is_complex():
        # a cast to a real dtype would silently drop the imaginary part: use the magnitude.
        # abs is C99's cabs (as the reference's L1): an infinite part makes it +inf even
        # beside a NaN part; L2 squares it so that both norms agree on what is inf or NaN
        magnitude = chunk.abs().to(work)
        return magnitude if norm == "L1" else magnitude.square_()
    chunk = chunk.to(work) if chunk.dtype != work else chunk
    return chunk.abs() if norm == "L1" else chunk.square()


def _sum_blocks(values: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Sums ``values`` (h, W) over ``block`` tiles; h is at most one block row high each."""
    block_h, block_w = block
    height, width = values.shape
    rows = math.ceil(height / block_h)
    if height % block_h:
        # only the last block row can be short: sum it separately
        full = (height // block_h) * block_h
        head = _sum_blocks(values[:full], block) if full else values.new_zeros(0, 0)
        tail = values[full:].sum(0, keepdim=True)
        tail = _sum_blocks(tail, (1, block_w))
        return torch.cat([head, tail]) if full else tail
    if block_h > 1:
        values = values.view(rows, block_h, width).sum(1)
    full_w = (width // block_w) * block_w
    cols = math.ceil(width / block_w)
    out = values.new_empty(rows, cols)
    if full_w:
        main = values[:, :full_w].reshape(rows, full_w // block_w, block_w)
        _sum_last_dim(main, out[:, : full_w // block_w])
    if full_w < width:
        out[:, -1] = values[:, full_w:].sum(1)
    return out


def _sum_last_dim(values: torch.Tensor, out: torch.Tensor) -> None:
    """``out = values.sum(-1)``; narrow blocks as strided adds, about twice as fast on CPU."""
    width = values.shape[-1]
    if width == 1:
        out.copy_(values[..., 0])
    elif width <= 8:
        torch.add(values[..., 0], values[..., 1], out=out)
        for i in range(2, width):
            out += values[..., i]
    else:
        torch.sum(values, dim=-1, out=out)


def block_scores(data2d: torch.Tensor, block: tuple[int, int], norm: str) -> torch.Tensor:
    """Mean of ``|x|`` (L1) or ``x**2`` (L2) over each block, partial blocks averaged over
    their valid entries (``avg_pool2d(ceil_mode=True)`` in the reference).

    Full blocks are returned as sums (same order as means, one pass less); partial blocks
    are scaled to the same scale, so only the ordering of the result is meaningful.
    """
    if data2d.numel() <= SMALL_ELEMENTS:
        # one op for small data (per-op overhead dominates there): the reference's arithmetic
        values = _magnitude(data2d, norm)[None, None]
        return F.avg_pool2d(values, block, block, ceil_mode=True)[0, 0]
    return chunked_block_scores(data2d, block, norm)


def chunked_block_scores(data2d: torch.Tensor, block: tuple[int, int], norm: str) -> torch.Tensor:
    """:func:`block_scores` of large data, whatever the size of ``data2d``: a shard of a
    large table must score its blocks with the arithmetic the whole table gets."""
    height, width = data2d.shape
    block_h, block_w = block
    rows, cols = grid_shape(height, width, block)
    scores = torch.empty(rows, cols, dtype=work_dtype(data2d.dtype), device=data2d.device)
    for start, stop in _row_chunks(height, width, block_h):
        chunk = data2d[start * block_h : min(stop * block_h, height)]
        scores[start:stop] = _sum_blocks(_magnitude(chunk, norm), block)
    # scale partial blocks to the full-block scale: sum * (values per block / valid count);
    # the corner gets both factors, which multiply to exactly its own ratio
    per_block = block_h * block_w
    if width % block_w:
        scores[:, -1] *= per_block / (block_h * (width % block_w))
    if height % block_h:
        scores[-1, :] *= per_block / ((height % block_h) * block_w)
    return scores


def smallest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A ``bool`` tensor marking exactly the ``k`` smallest scores; ties broken by index.

    NaN ranks above everything (``+inf`` included), as ``torch.sort`` puts it: NaN scores are
    marked only when ``k`` exceeds the NaN-free count, the first ones by position.

    Runs in O(n) with small temporaries: a strided sample brackets the k-th value, one pass
    counts what lies below the bracket and the few candidates inside it are selected exactly.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = _kth_smallest(flat, k)
    chosen = flat <= threshold  # never marks NaN
    extra = int(torch.count_nonzero(chosen)) - k
    if extra > 0:  # ties at the threshold: keep the first ones by position
        _drop_last_ties(flat, chosen, threshold, extra)
    elif extra < 0:
        # fewer than k marked: only a NaN threshold does that, i.e. k exceeds the NaN-free
        # blocks. All of those go, then the first NaN blocks by position.
        torch.eq(flat, flat, out=chosen)
        _take_first_nans(flat, chosen, k - int(torch.count_nonzero(chosen)))
    return chosen.view(scores.shape)


def _take_first_nans(flat: torch.Tensor, chosen: torch.Tensor, count: int) -> None:
    """Marks the first ``count`` NaN entries of ``flat`` in ``chosen``, a chunk at a time."""
    n = flat.numel()
    for start in range(0, n, CHUNK_ELEMENTS):
        if count <= 0:
            return
        stop = min(start + CHUNK_ELEMENTS, n)
        nans = flat[start:stop].isnan().nonzero().squeeze(1)[:count]
        chosen[start + nans] = True
        count -= nans.numel()


def _kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest score, NaN ranking last (``kthvalue``'s order): NaN when ``k``
    exceeds the NaN-free count."""
    n = flat.numel()
    if n <= (1 << 18):
        return torch.kthvalue(flat, k).values
    sample_size = 1 << 16
    sample = torch.sort(flat[:: n // sample_size]).values  # NaN sorts last
    m = sample.numel()
    pos = k / n * m
    spread = 4.0 * math.sqrt(m) + 2
    lo_index, hi_index = math.floor(pos - spread), math.ceil(pos + spread)
    lo = sample[lo_index] if lo_index >= 0 else None
    hi = sample[hi_index] if hi_index < m else None
    if lo is not None and bool(lo.isnan()):
        # the sample says the k-th is NaN: confirm by counting the NaN-free scores
        valid = sum(
            int(torch.count_nonzero(chunk == chunk)) for chunk in flat.split(CHUNK_ELEMENTS)
        )
        if k > valid:
            return flat.new_full((), math.nan)
        return torch.kthvalue(flat, k).values  # the sample misled us: exact
    if hi is not None and bool(hi.isnan()):
        hi = None  # NaN above the bracket: unbounded (comparisons never select NaN anyway)
    # one pass: count what lies below the bracket and keep what lies inside it (NaN in
    # neither)
    below, parts = 0, []
    for i in range(0, n, CHUNK_ELEMENTS):
        chunk = flat[i : i + CHUNK_ELEMENTS]
        if lo is not None:
            below += int(torch.count_nonzero(chunk < lo))
        parts.append(chunk[_between(chunk, lo, hi)])
    inside = torch.cat(parts)
    if below < k <= below + inside.numel():
        return torch.kthvalue(inside, k - below).values
    # the sample misled us (an adversarial layout, or NaN it missed): exact, at the cost of
    # more memory
    return torch.kthvalue(flat, k).values


def _between(chunk: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None) -> torch.Tensor:
    if lo is None:
        return chunk <= hi
    if hi is None:
        return chunk >= lo
    return (chunk >= lo).logical_and_(chunk <= hi)


def _drop_last_ties(
    flat: torch.Tensor, chosen: torch.Tensor, threshold: torch.Tensor, extra: int
) -> None:
    stop = flat.numel()
    while extra > 0 and stop > 0:
        start = max(0, stop - CHUNK_ELEMENTS)
        ties = (flat[start:stop] == threshold).nonzero().squeeze(1)
        drop = ties[max(0, ties.numel() - extra) :]
        chosen[start + drop] = False
        extra -= drop.numel()
        stop = start


_WORD_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _write_blocks_as_words(
    mask2d: torch.Tensor, keep: torch.Tensor, block: tuple[int, int]
) -> bool:
    """Fast path for ``bool`` masks whose block rows are 2, 4 or 8 bytes wide: each block row
    is written as one integer (``0x0101...`` or 0) instead of a broadcast byte copy."""
    height, width = mask2d.shape
    block_h, block_w = block
    word = _WORD_DTYPES.get(block_w)
    if word is None or width % block_w or mask2d.dtype != torch.bool or not mask2d.is_contiguous():
        return False
    ones = int.from_bytes(b"\x01" * block_w, "little")
    cols = width // block_w
    words = mask2d.view(word).view(height // block_h, block_h, cols)
    for start, stop in _row_chunks(height, width, block_h):
        target = words[start:stop]
        target.copy_(keep[start:stop, None, :].expand_as(target))
        target.mul_(ones)
    return True


def write_block_mask(mask2d: torch.Tensor, keep: torch.Tensor, block: tuple[int, int]) -> None:
    """Sets every entry of ``mask2d`` (H, W) to its block's value in ``keep`` (rows, cols)."""
    height, width = mask2d.shape
    block_h, block_w = block
    full_h = (height // block_h) * block_h
    full_w = (width // block_w) * block_w
    rows_f, cols_f = full_h // block_h, full_w // block_w
    if (
        mask2d.numel() > SMALL_ELEMENTS
        and full_h
        and _write_blocks_as_words(mask2d[:full_h], keep[:rows_f], block)
    ):
        pass
    elif full_h and full_w:
        mask2d[:full_h, :full_w].view(rows_f, block_h, cols_f, block_w).copy_(
            keep[:rows_f, None, :cols_f, None].expand(rows_f, block_h, cols_f, block_w)
        )
    if full_w < width and full_h:
        mask2d[:full_h, full_w:].view(rows_f, block_h, width - full_w).copy_(
            keep[:rows_f, None, cols_f:].expand(rows_f, block_h, width - full_w)
        )
    if full_h < height:
        tail = mask2d[full_h:]
        if full_w:
            tail[:, :full_w].view(height - full_h, cols_f, block_w).copy_(
                keep[rows_f, None, :cols_f, None].expand(height - full_h, cols_f, block_w)
            )
        if full_w < width:
            tail[:, full_w:].copy_(keep[rows_f, cols_f])


def _rank_keys(values: torch.Tensor) -> torch.Tensor:
    """Integer keys of magnitudes (``>= 0`` or NaN) in the same order, every NaN mapped to
    ``_NAN_KEY[dtype]`` just above ``+inf``: leaves the key ``_PAD_KEY[dtype]`` free for
    padding, which must rank after every real entry, NaN included. Reuses ``values``."""
    keys = values.view(_KEY_DTYPES[values.dtype])
    keys.bitwise_and_(_SIGN_CLEAR[values.dtype])  # -0.0 -> +0.0, and NaN of either sign
    return keys.clamp_(max=_NAN_KEY[values.dtype])


# the bits of non-negative floats order as the floats do; +inf's bits are the largest
# finite-or-inf key, NaN's lie above it
_KEY_DTYPES = {torch.float32: torch.int32, torch.float64: torch.int64}
_SIGN_CLEAR = {torch.float32: 0x7FFF_FFFF, torch.float64: 0x7FFF_FFFF_FFFF_FFFF}
_NAN_KEY = {torch.float32: 0x7F80_0001, torch.float64: 0x7FF0_0000_0000_0001}
_PAD_KEY = {torch.float32: 0x7F80_0002, torch.float64: 0x7FF0_0000_0000_0002}


def write_in_block_mask(
    mask2d: torch.Tensor,
    data2d: torch.Tensor,
    removed: torch.Tensor,
    block: tuple[int, int],
    zeros_per_block: int,
    norm: str,
) -> None:
    """In every block marked ``removed``, zeroes its ``zeros_per_block`` smallest entries
    (by ``norm``; finite, then inf, then NaN) and keeps the rest; blocks not removed are
    kept whole. A partial block zeroes ``min(zeros_per_block, its entries)``."""
    height, width = data2d.shape
    block_h, block_w = block
    cols = math.ceil(width / block_w)
    padded_w = cols * block_w
    for start, stop in _row_chunks(height, width, block_h):
        r0, r1 = start * block_h, min(stop * block_h, height)
        values = _magnitude(data2d[r0:r1], norm)
        keys = _rank_keys(values)
        rows = stop - start
        padded = keys.new_full((rows * block_h, padded_w), _PAD_KEY[values.dtype])
        padded[: r1 - r0, :width] = keys
        del values, keys
        tiles = padded.view(rows, block_h, cols, block_w).permute(0, 2, 1, 3)
        tiles = tiles.reshape(rows, cols, block_h * block_w)
        # padding ranks last, so partial blocks drop their real entries first (as torch)
        order = torch.topk(tiles, zeros_per_block, dim=2, largest=False).indices
        tile_keep = torch.ones(tiles.shape, dtype=torch.bool, device=data2d.device)
        tile_keep.scatter_(2, order, False)
        tile_keep |= ~removed[start:stop, :, None]
        chunk_mask = tile_keep.view(rows, cols, block_h, block_w).permute(0, 2, 1, 3)
        chunk_mask = chunk_mask.reshape(rows * block_h, padded_w)
        mask2d[r0:r1].copy_(chunk_mask[: r1 - r0, :width])
