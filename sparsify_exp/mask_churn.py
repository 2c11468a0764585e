"""Churn between steps: how many mask entries flipped since the previous step, remembering each
mask at 1 bit an entry (a byte-per-entry copy of an 8 GiB table's mask would be 2 GB)."""

from __future__ import annotations

import torch

from sparsify_exp.sparsifier.mask_bits import pack_mask, packed_nbytes

# Entries packed and compared at a time (a multiple of 8, so chunks start on a byte boundary):
# the transient memory stays near this many bytes however large the mask is.
_CHUNK_ENTRIES = 1 << 23


def _popcount(bytes_: torch.Tensor) -> torch.Tensor:
    """Set bits of a ``uint8`` tensor, summed (int64 scalar), with uint8 temporaries only."""
    x = bytes_ - ((bytes_ >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    x = (x + (x >> 4)) & 0x0F
    return x.sum(dtype=torch.int64)


class MaskChurn:
    """The previous step's masks, packed; :meth:`update` counts the flips and remembers the new
    mask. O(mask) time, 1 bit an entry kept between steps."""

    def __init__(self, chunk_entries: int = _CHUNK_ENTRIES) -> None:
        if chunk_entries <= 0 or chunk_entries % 8:
            raise ValueError(f"chunk_entries must be a positive multiple of 8; got {chunk_entries}")
        self.chunk_entries = chunk_entries
        self._packed: dict[str, torch.Tensor] = {}

    def update(self, name: str, mask: torch.Tensor) -> int:
        """Entries of ``mask`` (nonzero = kept) that differ from the last mask seen for ``name``
        (0 the first time), which it then replaces."""
        flat = mask.reshape(-1)
        prev = self._packed.get(name)
        first = prev is None
        if prev is None:
            prev = torch.empty(packed_nbytes(flat.numel()), dtype=torch.uint8, device=mask.device)
            self._packed[name] = prev
        changed = torch.zeros((), dtype=torch.int64, device=mask.device)
        step = self.chunk_entries
        for start in range(0, flat.numel(), step):
            cur = pack_mask(flat[start : start + step])
            old = prev[start // 8 : start // 8 + cur.numel()]
            if not first:
                changed += _popcount(cur ^ old)
            old.copy_(cur)
        return 0 if first else int(changed)

    def clear(self) -> None:
        """Forgets every mask (frees the memory once the steps are done)."""
        self._packed.clear()
