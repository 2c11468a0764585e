"""Sparse checkpoints in one safetensors file, written and read with torch and safetensors only.

Two layouts, chosen per tensor:

* ``sparse-bitmask``, the layout compressed-tensors (< 0.15) wrote for sparse weights. A tensor
  ``<prefix>.weight`` becomes four entries: ``<prefix>.shape`` (int64, the dense shape),
  ``<prefix>.compressed`` (the kept values, 1-D, in the tensor's dtype, row-major order),
  ``<prefix>.bitmask`` (uint8; the tensor seen as ``rows x cols`` with ``cols`` its last
  dimension, each row packed to ``ceil(cols / 8)`` bytes, bit ``j % 8`` of byte ``j // 8``
  (least significant first) is column ``j``; 1 = kept) and ``<prefix>.row_offsets`` (int64,
  where each row's values start in ``compressed``). A name that does not end in ``.weight``
  keeps its full name as the prefix. A 1-D tensor is one row (its bitmask is 1-D).
* ``rows``, for tables whose removed entries are whole rows: ``<prefix>.rows`` (the kept
  rows) and ``<prefix>.remap`` (int32 or int64 ``(num_rows,)``: the kept row a row became,
  -1 for a removed row). :class:`RemappedEmbedding` looks rows up through it directly.

Every other tensor is stored as it is, under its own name; so is a masked tensor whose
encoding would not be smaller than itself (a nearly dense one). The header metadata holds
``format: pt`` (what transformers checks), ``sparsify_exp.layout`` and
``sparsify_exp.sparse`` (JSON ``{name: {"layout": ..., "prefix": ...}}``), so names that do
not end in ``.weight`` come back under their own name. :func:`load_sparse` also reads files
that compressed-tensors wrote (no such metadata: ``<prefix>.weight``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BITMASK",
    "LAYOUTS",
    "ROWS",
    "RemappedEmbedding",
    "bitmask_decode",
    "bitmask_encode",
    "load_compact_rows",
    "load_sparse",
    "save_sparse",
]

BITMASK = "sparse-bitmask"
ROWS = "rows"
LAYOUTS = (BITMASK, ROWS)
META_LAYOUT = "sparsify_exp.layout"
META_SPARSE = "sparsify_exp.sparse"
BITMASK_PARTS = ("shape", "compressed", "bitmask", "row_offsets")
ROWS_PARTS = ("rows", "remap")

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """The tensor as ``rows x cols`` (cols: its last dimension)."""
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1, t.shape[-1])


def _pack_rows(mask2d: torch.Tensor) -> torch.Tensor:
    rows, cols = mask2d.shape
    padded = F.pad(mask2d.to(torch.uint8), (0, (-cols) % 8))
    return (padded.view(rows, -1, 8) * _BITS).sum(-1, dtype=torch.uint8)


def _unpack_rows(bitmask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    packed = bitmask.reshape(rows, -1)
    bits = packed[..., None].bitwise_and(_BITS).ne(0)
    return bits.reshape(rows, -1)[:, :cols]


def bitmask_encode(tensor: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
    """``{shape, compressed, bitmask, row_offsets}`` of ``tensor``: the entries ``mask`` keeps
    (nonzero entries when no mask is given, as compressed-tensors does)."""
    t = tensor.detach().cpu()
    if t.dim() == 0:
        raise ValueError("a 0-d tensor has no bitmask layout")
    keep = (t != 0) if mask is None else torch.as_tensor(mask).detach().cpu().reshape(t.shape)
    keep = keep if keep.dtype == torch.bool else keep != 0
    keep2d = _as_rows(keep)
    counts = keep2d.sum(-1)
    bitmask = _pack_rows(keep2d)
    return {
        "shape": torch.tensor(list(t.shape), dtype=torch.int64),
        "compressed": t[keep].contiguous(),
        "bitmask": bitmask.reshape(-1) if t.dim() == 1 else bitmask,
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def bitmask_decode(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dense tensor of a ``sparse-bitmask`` entry (zeros where the bitmask is 0)."""
    shape = [int(s) for s in parts["shape"].reshape(-1).tolist()]
    values = parts["compressed"]
    cols = shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    keep = _unpack_rows(parts["bitmask"], rows, cols).reshape(shape)
    kept = int(keep.count_nonzero())
    if kept != values.numel():
        raise ValueError(f"bitmask keeps {kept} entries but {values.numel()} values are stored")
    out = torch.zeros(shape, dtype=values.dtype)
    out[keep] = values
    return out


def _bitmask_nbytes(t: torch.Tensor, kept: int) -> int:
    rows = 1 if t.dim() == 1 else t.numel() // max(t.shape[-1], 1)
    cols = t.shape[-1]
    return kept * t.element_size() + rows * ((cols + 7) // 8) + 8 * rows + 8 * t.dim()


def _whole_rows(keep: torch.Tensor) -> torch.Tensor | None:
    """The kept rows when every row is kept or removed whole, else None."""
    if keep.dim() < 2:
        return None
    per_row = keep.reshape(keep.shape[0], -1)
    kept = per_row.any(1)
    return kept if bool((per_row.all(1) == kept).all()) else None


def _prefix(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def save_sparse(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    layout: str = BITMASK,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Writes ``tensors`` to ``path`` with each name of ``masks`` in ``layout`` (the masked
    entries dropped; every other tensor as it is); returns ``{name: layout}`` of what was
    encoded (``dense`` where the encoding would not be smaller).

    ``masks=None`` encodes every floating tensor with a dimension by its nonzero entries.
    ``layout=rows`` writes tensors whose mask removes whole rows as kept rows + remap, and
    the others as ``sparse-bitmask``.
    """
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: must be one of {', '.join(LAYOUTS)}")
    if masks is None:
        masks = {n: t != 0 for n, t in tensors.items() if t.is_floating_point() and t.dim() > 0}
    unknown = sorted(set(masks) - set(tensors))
    if unknown:
        raise KeyError(f"masks for names that are not among the tensors: {', '.join(unknown)}")
    out: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict[str, str]] = {}
    written: dict[str, str] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().cpu()
        if name in masks and t.dim() > 0:
            keep = torch.as_tensor(masks[name]).detach().cpu().reshape(t.shape)
            keep = keep if keep.dtype == torch.bool else keep != 0
            parts, chosen = _encode(t, keep, layout)
            if parts is not None:
                prefix = _prefix(name)
                for part, value in parts.items():
                    out[f"{prefix}.{part}"] = value
                sparse[name] = {"layout": chosen, "prefix": prefix}
                written[name] = chosen
                continue
            written[name] = "dense"
            if not bool(keep.all()):  # the masked entries read as zeros whatever was passed
                t = t.masked_fill(~keep, 0)
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen or not t.is_contiguous():  # tied weights, views: safetensors refuses
            t = t.clone().contiguous()
        elif ptr != -1:
            seen.add(ptr)
        out[name] = t
    clashes = sorted(
        f"{p['prefix']}.{part}"
        for p in sparse.values()
        for part in (BITMASK_PARTS if p["layout"] == BITMASK else ROWS_PARTS)
        if f"{p['prefix']}.{part}" in tensors
    )
    if clashes:
        raise ValueError(f"encoded keys clash with tensors of the same name: {', '.join(clashes)}")
    meta = {**dict(metadata or {}), "format": "pt", META_LAYOUT: layout}
    meta[META_SPARSE] = json.dumps(sparse, separators=(",", ":"))
    from sparsify_exp.atomic import atomic_path

    with atomic_path(path) as tmp:  # whole or absent, never torn
        save_file(out, str(tmp), metadata=meta)
    return written


def _encode(
    t: torch.Tensor, keep: torch.Tensor, layout: str
) -> tuple[dict[str, torch.Tensor] | None, str]:
    dense = t.numel() * t.element_size()
    if layout == ROWS:
        rows = _whole_rows(keep)
        if rows is not None:
            remap_dtype = torch.int32 if rows.numel() < 2**31 else torch.int64
            index = rows.nonzero().squeeze(1)
            remap = torch.full((rows.numel(),), -1, dtype=remap_dtype)
            remap[index] = torch.arange(index.numel(), dtype=remap_dtype)
            encoded = {"rows": t.index_select(0, index).contiguous(), "remap": remap}
            size = sum(v.numel() * v.element_size() for v in encoded.values())
            return (encoded, ROWS) if size < dense else (None, "dense")
    kept = int(keep.count_nonzero())
    if _bitmask_nbytes(t, kept) >= dense:
        return None, "dense"
    return bitmask_encode(t, keep), BITMASK


def _files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no .safetensors file in this folder")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return [path]


def load_sparse(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{name: dense tensor}`` from a file :func:`save_sparse` wrote (or a folder of
    ``.safetensors`` files, e.g. a Hugging Face model folder): encoded tensors are expanded
    (zeros where entries or rows were removed), the others come back as stored."""
    from safetensors import safe_open

    result: dict[str, torch.Tensor] = {}
    for file in _files(path):
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        result.update(_expand(raw, meta))
    return result


def _expand(raw: dict[str, torch.Tensor], meta: Mapping[str, str]) -> dict[str, torch.Tensor]:
    if META_SPARSE in meta:
        sparse = json.loads(meta[META_SPARSE])
    else:  # a file compressed-tensors wrote: every complete group of its four parts
        prefixes = {k.rsplit(".", 1)[0] for k in raw if k.endswith(".bitmask")}
        sparse = {
            f"{p}.weight": {"layout": BITMASK, "prefix": p}
            for p in prefixes
            if all(f"{p}.{part}" in raw for part in BITMASK_PARTS)
        }
    out: dict[str, torch.Tensor] = {}
    for name, spec in sparse.items():
        prefix, kind = spec["prefix"], spec["layout"]
        parts = BITMASK_PARTS if kind == BITMASK else ROWS_PARTS
        values = {part: raw.pop(f"{prefix}.{part}") for part in parts}
        out[name] = bitmask_decode(values) if kind == BITMASK else _expand_rows(values)
    return {**raw, **out}


def _expand_rows(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    rows, remap = parts["rows"], parts["remap"].long()
    out = rows.new_zeros((remap.numel(), *rows.shape[1:]))
    kept = remap >= 0
    out[kept] = rows[remap[kept]]
    return out


def load_compact_rows(path: str | os.PathLike, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, remap)`` of a table stored in the ``rows`` layout, without expanding it."""
    from safetensors import safe_open

    for file in _files(path):
        with safe_open(str(file), framework="pt") as f:
            sparse = json.loads((f.metadata() or {}).get(META_SPARSE, "{}"))
            spec = sparse.get(name)
            if spec is None:
                continue
            if spec["layout"] != ROWS:
                raise ValueError(f"{name} is stored as {spec['layout']}, not {ROWS}")
            prefix = spec["prefix"]
            return f.get_tensor(f"{prefix}.rows"), f.get_tensor(f"{prefix}.remap")
    raise KeyError(f"{path}: no table {name!r} in the rows layout")


class RemappedEmbedding(nn.Module):
    """An embedding (or, with ``mode``, an embedding bag) over the kept rows of a row-pruned
    table: ids go through ``remap`` (-1: a removed row, read as zeros) to the compact rows,
    so the table is never expanded to its dense size.

    ``RemappedEmbedding.from_file("sparsified.safetensors", "tables.user.weight")``
    """

    def __init__(self, rows: torch.Tensor, remap: torch.Tensor, mode: str | None = None) -> None:
        super().__init__()
        if rows.dim() != 2:
            raise ValueError(f"rows must be 2-D (kept rows x dim); got shape {tuple(rows.shape)}")
        if mode not in (None, "sum", "mean", "max"):
            raise ValueError(f"mode={mode!r}: must be None, 'sum', 'mean' or 'max'")
        zero = rows.new_zeros(1, rows.shape[1])  # where a removed row's lookups land
        self.weight = nn.Parameter(torch.cat([rows, zero]), requires_grad=False)
        index = remap.long()
        self.register_buffer("remap", torch.where(index < 0, rows.shape[0], index))
        self.mode = mode

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, name: str, mode: str | None = None
    ) -> RemappedEmbedding:
        rows, remap = load_compact_rows(path, name)
        return cls(rows, remap, mode)

    @property
    def num_embeddings(self) -> int:
        """Rows of the original table."""
        return int(self.remap.numel())

    def forward(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        index = self.remap[ids]
        if self.mode is None:
            return F.embedding(index, self.weight)
        return F.embedding_bag(
            index, self.weight, offsets, mode=self.mode, per_sample_weights=per_sample_weights
        )
