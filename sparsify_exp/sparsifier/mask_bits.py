"""1-bit-per-entry encoding of boolean masks, for checkpoints and artifacts.

A dense ``bool`` mask costs a byte an entry; packed, a 1M x 64 mask is 8 MB instead of 64 MB.
Only tensors and ints are produced, so the result loads with ``torch.load(weights_only=True)``
and stores in safetensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=device)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Packs a mask (any dtype; nonzero = kept) into a flat ``uint8`` tensor, 8 entries a byte.

    Entry ``i`` of the flattened mask is bit ``i % 8`` (least significant first) of byte ``i // 8``.
    A contiguous ``bool`` mask is read in place: only the packed result is allocated; a
    :class:`~sparsify_exp.sparsifier.packed_mask.PackedMask` gives its own bytes.
    """
    from sparsify_exp.sparsifier.packed_mask import PackedMask

    if isinstance(mask, PackedMask):
        return mask.bits
    flat = mask.detach().reshape(-1)
    if flat.dtype != torch.bool:
        flat = flat != 0
    if flat.device.type == "cpu" and _numpy() is not None:
        # numpy's packbits is ~10x faster than the torch fallback on large CPU masks
        packed = _numpy().packbits(flat.as_subclass(torch.Tensor).numpy(), bitorder="little")
        return torch.from_numpy(packed)
    numel = flat.numel()
    whole = numel - numel % 8
    packed = torch.zeros(packed_nbytes(numel), dtype=torch.uint8, device=mask.device)
    _pack_into(packed[: whole // 8], flat[:whole].view(-1, 8))
    if whole < numel:  # the last, partial byte
        tail = torch.zeros(8, dtype=torch.bool, device=mask.device)
        tail[: numel - whole] = flat[whole:]
        _pack_into(packed[whole // 8 :], tail.view(1, 8))
    return packed


def _pack_into(out: torch.Tensor, groups: torch.Tensor) -> None:
    groups = groups.view(torch.uint8)
    for bit, weight in enumerate(_BIT_WEIGHTS):
        out.add_(groups[:, bit] * weight)


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def unpack_mask(
    packed: torch.Tensor, shape: Sequence[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a ``bool`` tensor of ``shape``."""
    shape = tuple(int(s) for s in shape)
    numel = 1
    for size in shape:
        numel *= size
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"packed mask must be a 1-D uint8 tensor of {(numel + 7) // 8} bytes for shape "
            f"{shape}; got dtype {packed.dtype} and shape {tuple(packed.shape)}"
        )
    packed = packed.to(device) if device is not None else packed
    bits = packed[:, None].bitwise_and(_bit_weights(packed.device)).ne(0)
    return bits.view(-1)[:numel].view(shape)


def packed_nbytes(numel: int) -> int:
    """Bytes :func:`pack_mask` needs for ``numel`` entries."""
    return (numel + 7) // 8
