"""PackedMask: a mask held at 1 bit an entry, read and written a range of entries at a time.

A ``bool`` mask costs a byte an entry: a quarter of fp32 data, too much beside a table that
is memory-mapped because it does not fit in memory. A :class:`PackedMask` keeps the
:func:`~sparsify_exp.sparsifier.mask_bits.pack_mask` bytes (bit ``i % 8`` of byte ``i // 8``
is entry ``i`` of the flattened mask, 1 = kept) and offers what code that reads masks in
chunks uses: ``shape``, ``numel()``, ``count_nonzero()``, ``reshape(-1)`` and slices along
the first dimension, which come back as ordinary ``bool`` tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparsify_exp.sparsifier.mask_bits import packed_nbytes

__all__ = ["PackedMask"]

# bytes popcounted at a time: bounds the temporaries of count_nonzero
_COUNT_BYTES = 1 << 24


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """``keep`` (1-D ``bool``) packed, 8 entries a byte, least significant bit first."""
    if keep.device.type == "cpu" and _numpy() is not None:
        return torch.from_numpy(_numpy().packbits(keep.numpy(), bitorder="little"))
    from sparsify_exp.sparsifier.mask_bits import pack_mask

    return pack_mask(keep)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` entries (``bool``, 1-D) of the bytes ``packed``."""
    if packed.device.type == "cpu" and _numpy() is not None:
        bits = _numpy().unpackbits(packed.numpy(), count=count, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device)
    return packed[:, None].bitwise_and(weights).ne(0).view(-1)[:count]


def _popcount(bytes_: torch.Tensor) -> int:
    x = bytes_ - ((bytes_ >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    x = (x + (x >> 4)) & 0x0F
    return int(x.sum(dtype=torch.int64))


class PackedMask:
    """A mask of ``shape`` stored as packed bits (``bits``, ``uint8``); the bits past the last
    entry are always 0.

    Reading a range unpacks only that range; writing packs it into place. It is not a
    ``torch.Tensor``: code that needs one asks for a range (or :meth:`unpack` for all).
    """

    dtype = torch.bool

    def __init__(self, bits: torch.Tensor, shape: Sequence[int]) -> None:
        self.shape = torch.Size(int(s) for s in shape)
        if (
            bits.dtype != torch.uint8
            or bits.dim() != 1
            or bits.numel() != packed_nbytes(self.shape.numel())
        ):
            raise ValueError(
                f"bits must be a 1-D uint8 tensor of {packed_nbytes(self.shape.numel())} bytes "
                f"for shape {tuple(self.shape)}; got {bits.dtype} of shape {tuple(bits.shape)}"
            )
        self.bits = bits

    @classmethod
    def full(
        cls, shape: Sequence[int], keep: bool = True, device: torch.device | str | None = None
    ) -> PackedMask:
        """Every entry kept (``keep=True``) or removed."""
        numel = torch.Size(shape).numel()
        mask = cls(torch.empty(packed_nbytes(numel), dtype=torch.uint8, device=device), shape)
        return mask.fill_(keep)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> PackedMask:
        """A packed copy of ``mask`` (any dtype; nonzero = kept)."""
        flat = mask.detach().reshape(-1)
        return cls(pack_bits(flat if flat.dtype == torch.bool else flat != 0), mask.shape)

    # ------------------------------------------------------------------ tensor-like
    @property
    def device(self) -> torch.device:
        return self.bits.device

    def numel(self) -> int:
        return self.shape.numel()

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return self.shape[0]

    def detach(self) -> PackedMask:
        return self

    def count_nonzero(self) -> torch.Tensor:
        """Entries kept, as a 0-d int64 tensor (like ``torch.count_nonzero``)."""
        total = 0
        for start in range(0, self.bits.numel(), _COUNT_BYTES):
            total += _popcount(self.bits[start : start + _COUNT_BYTES])
        return torch.tensor(total)

    def reshape(self, *shape: int | Sequence[int]) -> PackedMask:
        """The same bits seen with another shape (``-1`` allowed once)."""
        sizes = list(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        known = 1
        for s in sizes:
            known *= s if s != -1 else 1
        sizes = [self.numel() // max(known, 1) if s == -1 else s for s in sizes]
        if torch.Size(sizes).numel() != self.numel():
            raise ValueError(f"cannot view a mask of shape {tuple(self.shape)} as {tuple(sizes)}")
        return PackedMask(self.bits, sizes)

    view = reshape

    def __getitem__(self, index: int | slice) -> torch.Tensor:
        """Rows of the first dimension as a ``bool`` tensor (``mask[a:b]``, ``mask[i]``)."""
        if not self.shape:
            raise IndexError("a 0-d mask has no rows; use unpack()")
        rows = self.shape[0]
        row = self.shape[1:].numel()
        if isinstance(index, int):
            if not -rows <= index < rows:
                raise IndexError(f"row {index} out of range for {rows} rows")
            index %= rows
            return self.read(index * row, (index + 1) * row).view(self.shape[1:])
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a PackedMask is indexed by a row or a slice of rows (step 1)")
        start, stop, _ = index.indices(rows)
        stop = max(start, stop)
        return self.read(start * row, stop * row).view(stop - start, *self.shape[1:])

    def unpack(self) -> torch.Tensor:
        """The whole mask as a ``bool`` tensor (a byte an entry)."""
        return self.read(0, self.numel()).view(self.shape)

    def __repr__(self) -> str:
        return f"PackedMask(shape={tuple(self.shape)}, bytes={self.bits.numel()})"

    # ------------------------------------------------------------------ ranges
    def read(self, start: int, stop: int) -> torch.Tensor:
        """Entries ``[start, stop)`` of the flattened mask, ``bool``, 1-D (a new tensor)."""
        first = start // 8
        bits = self.bits[first : packed_nbytes(stop)]
        return unpack_bits(bits, stop - first * 8)[start - first * 8 :]

    def write(self, start: int, keep: torch.Tensor) -> None:
        """Entries ``[start, start + len(keep))`` become ``keep`` (1-D ``bool``)."""
        stop = start + keep.numel()
        if stop > self.numel():
            raise ValueError(f"entries [{start}, {stop}) exceed the mask's {self.numel()}")
        if keep.numel() == 0:
            return
        aligned = start % 8 == 0 and (stop % 8 == 0 or stop == self.numel())
        if not aligned:  # merge with the neighbours that share the first and last byte
            first, last = start - start % 8, min(self.numel(), -(-stop // 8) * 8)
            merged = self.read(first, last)
            merged[start - first : stop - first] = keep
            start, keep = first, merged
        packed = pack_bits(keep)
        self.bits[start // 8 : start // 8 + packed.numel()] = packed.to(self.bits.device)

    def set_kept(self, positions: torch.Tensor) -> None:
        """Marks the flat ``positions`` (int64, distinct) kept."""
        if positions.numel() == 0:
            return
        positions = positions.to(self.bits.device)
        byte, inverse = torch.unique(positions >> 3, return_inverse=True)
        weights = torch.ones_like(positions).bitwise_left_shift_(positions & 7)
        # distinct positions set distinct bits of a byte: their sum is their OR
        ors = torch.zeros(byte.numel(), dtype=torch.int64, device=positions.device)
        ors.index_add_(0, inverse, weights)
        self.bits[byte] |= ors.to(torch.uint8)

    def fill_(self, keep: bool) -> PackedMask:
        """Every entry kept (``True``) or removed."""
        self.bits.fill_(0xFF if keep else 0)
        tail = self.numel() % 8
        if keep and tail:
            self.bits[-1] = (1 << tail) - 1
        return self
