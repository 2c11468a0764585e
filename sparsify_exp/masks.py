"""The mask file format: every mask of a sparsifier in one safetensors file, 1 bit an entry.

Each name holds the ``pack_mask`` bytes of its mask (bit ``i % 8``, least significant first, of
byte ``i // 8`` is entry ``i`` of the flattened mask; 1 = kept). The header metadata holds
``format`` (:data:`MASK_FORMAT`) and ``shapes`` (JSON ``{name: shape}``). Readable with any
safetensors reader; :func:`load_masks` gives the bool masks back. Torch and safetensors only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sparsify_exp.atomic import atomic_path
from sparsify_exp.sparsifier.mask_bits import pack_mask, unpack_mask

__all__ = ["MASK_FORMAT", "load_masks", "save_masks"]

MASK_FORMAT = "sparsify_exp.packed_mask.v1"


def save_masks(source: Any, names: Iterable[str] | None, path: str | os.PathLike) -> Path:
    """Writes the masks of ``names`` (all when None) to ``path``; returns the path.

    ``source`` is a sparsifier (anything with ``get_mask(name)``) or a ``{name: mask}`` mapping.
    """
    from safetensors.torch import save_file

    if isinstance(source, Mapping):
        chosen = list(names) if names is not None else list(source)
        masks = {name: source[name] for name in chosen}
    else:
        chosen = list(names) if names is not None else list(source.data_groups)
        masks = {name: source.get_mask(name) for name in chosen}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    packed = {name: pack_mask(mask) for name, mask in masks.items()}
    shapes = {name: list(mask.shape) for name, mask in masks.items()}
    with atomic_path(path) as tmp:  # whole or absent, never torn
        save_file(packed, str(tmp), metadata={"format": MASK_FORMAT, "shapes": json.dumps(shapes)})
    return path


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{name: bool mask}`` from a file written by :func:`save_masks`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != MASK_FORMAT:
            raise ValueError(f"{path}: not a {MASK_FORMAT} file (format={meta.get('format')!r})")
        shapes = json.loads(meta["shapes"])
        return {name: unpack_mask(f.get_tensor(name), shapes[name]) for name in shapes}
