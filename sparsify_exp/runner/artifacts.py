"""What a run writes besides its metrics: the per-name table, the storage sizes (and what
serving costs: quantized tables, rows compacted), and a picture of each 2-D mask."""

from __future__ import annotations

import copy
import csv
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sparsify_exp.atomic import atomic_path
from sparsify_exp.runner.progress import human_bytes
from sparsify_exp.sparsifier.row import compact_rows

log = logging.getLogger("sparsify_exp.runner")

# Entries a block-average reads at a time: the transient memory stays near this many bytes
# (a bool copy of the chunk) however large the mask is.
_CHUNK_ENTRIES = 1 << 18


def data_kind(obj: Any) -> str:
    """The ``kind`` column of the per-name table."""
    from torch import nn

    if isinstance(obj, nn.EmbeddingBag):
        return "embedding_bag"
    if isinstance(obj, nn.Embedding):
        return "embedding"
    if isinstance(obj, nn.Parameter):
        return "parameter"
    return "tensor"


def write_table(
    path: Path,
    bundle: Any,
    added: Mapping[str, Any],
    sparsity: Mapping[str, float],
    measured: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
    """``per_name.csv``: every name of the data, sparsified or kept dense, with its sparsity and
    what the evaluators measured of it, each column named like the metric family whose first
    ``mlflow.max_name_metrics`` names MLflow gets (``sparsity``, ``fidelity/rel_error``, ...);
    then the 0-size floating tensors (kind ``empty``: nothing to sparsify, written as is)."""
    from sparsify_exp.runner.data import as_tensor

    measured = measured or {}
    columns = list(dict.fromkeys(c for row in measured.values() for c in row))
    with atomic_path(path, fsync=False) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "kind", "shape", "numel", "dtype", "sparsified", "sparsity", *columns])
        for name, obj in bundle.named_data.items():
            t = as_tensor(obj)
            row = measured.get(name, {})
            w.writerow(
                [
                    name,
                    data_kind(obj),
                    "x".join(str(s) for s in t.shape),
                    t.numel(),
                    str(t.dtype).removeprefix("torch."),
                    name in added,
                    f"{sparsity.get(name, 0.0):.6f}",
                    *(f"{row[c]:.6g}" if c in row else "" for c in columns),
                ]
            )
        for name, t in bundle.extra_tensors.items():  # written as they are: nothing to mask
            if t.numel() == 0 and t.is_floating_point():
                shape = "x".join(str(s) for s in t.shape)
                dtype = str(t.dtype).removeprefix("torch.")
                w.writerow([name, "empty", shape, 0, dtype, False, "", *("" for _ in columns)])


def storage_sizes(
    bundle: Any, added: Mapping[str, Any], kept: Mapping[str, int]
) -> dict[str, float]:
    """Bytes of every written tensor stored dense, and stored compactly: each sparsified tensor
    as a 1-bit-per-entry mask plus its kept values (the bitmask encoding), or dense where that
    is smaller (nearly dense data). See docs/runner.md."""
    from sparsify_exp.runner.data import as_tensor
    from sparsify_exp.sparsifier.mask_bits import packed_nbytes

    dense = sum(t.numel() * t.element_size() for t in bundle.tensors().values())
    saved = 0
    for name, obj in added.items():
        t = as_tensor(obj)
        encoded = packed_nbytes(t.numel()) + kept[name] * t.element_size()
        saved += max(t.numel() * t.element_size() - encoded, 0)
    return {"size/dense_bytes": float(dense), "size/compressed_bytes": float(dense - saved)}


SPARSE_LAYOUTS = {"bitmask": "sparse-bitmask", "rows": "rows"}
"""``output.format`` -> the :mod:`sparsify_exp.sparse_format` layout it writes."""


def block_factors(rows: int, cols: int, max_side: int) -> tuple[int, int]:
    """Rows and columns per block so that a ``rows x cols`` mask fits ``max_side`` a side;
    an axis that fits is not reduced."""
    return max(1, math.ceil(rows / max_side)), max(1, math.ceil(cols / max_side))


def block_average(
    mask: torch.Tensor, max_side: int, *, chunk_entries: int = _CHUNK_ENTRIES
) -> torch.Tensor:
    """The fraction kept (nonzero) in each ``fh x fw`` block of a 2-D ``mask``, as a float32
    image on the CPU at most ``max_side`` a side.

    ``fh = ceil(rows / max_side)``, ``fw = ceil(cols / max_side)``; the blocks of the last row
    band and column group may be partial and are averaged over the entries they have. The mask
    is read ``chunk_entries`` at a time, so a mask of billions of entries needs no float copy
    (``adaptive_avg_pool2d`` would take 4 bytes an entry).
    """
    rows, cols = mask.shape
    fh, fw = block_factors(rows, cols, max_side)
    h, w = math.ceil(rows / fh), math.ceil(cols / fw)
    full_cols = (cols // fw) * fw  # columns in whole fw-wide blocks; the rest is one partial block
    cols_per_chunk = fw * max(1, chunk_entries // fw)
    rows_per_chunk = max(1, chunk_entries // min(cols_per_chunk, max(cols, 1)))
    widths = torch.full((w,), float(fw), dtype=torch.float64)
    if full_cols < cols:
        widths[-1] = float(cols - full_cols)
    image = torch.empty(h, w, dtype=torch.float32)
    for i in range(h):
        r0, r1 = i * fh, min((i + 1) * fh, rows)
        kept = torch.zeros(w, dtype=torch.int64, device=mask.device)
        for r in range(r0, r1, rows_per_chunk):
            band = mask[r : min(r + rows_per_chunk, r1)]
            for c in range(0, full_cols, cols_per_chunk):
                piece = band[:, c : min(c + cols_per_chunk, full_cols)]
                blocks = piece.reshape(piece.shape[0], -1, fw)
                kept[c // fw : c // fw + blocks.shape[1]] += torch.count_nonzero(blocks, dim=(0, 2))
            if full_cols < cols:
                kept[-1] += torch.count_nonzero(band[:, full_cols:])
        image[i] = (kept.cpu().double() / (widths * (r1 - r0))).float()
    return image


def mask_images(sp: Any, names: list[str], out: Path, limit: int, max_side: int) -> int:
    """A PNG per 2-D mask (at most ``limit``), in grey on a linear scale of the fraction
    kept: white = kept, black = zeroed, so 50% and 90% look as different as they are. A mask
    larger than ``max_side`` a side is drawn one pixel per ``fh x fw`` entries (only the long
    axis is reduced; the pixel's grey is the fraction of those entries kept); a smaller one an
    entry a square of at least 2 x 2 screen pixels, so 1x4 blocks show as 8-pixel dashes."""
    two_d = [n for n in names if sp.get_mask(n).dim() == 2][:limit]
    if not two_d:
        return 0
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sparsify_exp.runner.tracking.keys import name_file_stem

    out.mkdir(parents=True, exist_ok=True)
    for name in two_d:
        mask = sp.get_mask(name)
        rows, cols = mask.shape
        fh, fw = block_factors(rows, cols, max_side)
        kept = block_average(mask, max_side).numpy()
        h, w = kept.shape
        removed = mask.numel() - int(mask.count_nonzero())
        scale = 50 if (fh, fw) == (1, 1) else 75  # 2 screen pixels an entry; else 1.3 a pixel
        fig = Figure(figsize=(max(6.4, w / scale + 1.6), max(4.8, h / scale + 1.2)), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        im = ax.imshow(
            kept,
            cmap="gray",
            vmin=0.0,
            vmax=1.0,
            aspect="auto",
            interpolation="nearest",
            extent=(0, w * fw, h * fh, 0),  # a partial edge block is drawn at its true size
        )
        ax.set_xlim(0, cols)
        ax.set_ylim(rows, 0)
        for spine in ax.spines.values():  # a frame line would hide the first and last rows
            spine.set_visible(False)
        scale_note = "" if (h, w) == (rows, cols) else f"; a pixel = {fh}x{fw} entries, averaged"
        ax.set_title(  # two lines: a long name and the counts both fit a narrow figure
            f"{name}  {rows}x{cols}\n{removed:,} of {mask.numel():,} zeroed "
            f"({removed / max(mask.numel(), 1):.1%}){scale_note}",
            fontsize=9,
        )
        ax.set_xlabel("column")
        ax.set_ylabel("row")
        bar = fig.colorbar(im, ax=ax, ticks=[0, 0.25, 0.5, 0.75, 1.0])
        bar.set_label("fraction kept (white: all kept, black: all zeroed)")
        bar.ax.set_yticklabels(["0%", "25%", "50%", "75%", "100%"])
        fig.tight_layout()
        with atomic_path(out / f"{name_file_stem(name)}.png", fsync=False) as tmp:
            fig.savefig(tmp, format="png")
    return len(two_d)


# ----------------------------------------------------------------------------- serving sizes


def embedding_tables(bundle: Any) -> dict[str, Any]:
    """The data's ``nn.Embedding`` / ``nn.EmbeddingBag`` tables by the name their weight is
    written under: embedding modules of the named data, and a model's embedding submodules."""
    from torch import nn

    kinds = (nn.Embedding, nn.EmbeddingBag)
    tables = {n: m for n, m in bundle.named_data.items() if isinstance(m, kinds)}
    if bundle.model is not None:
        for prefix, module in bundle.model.named_modules():
            if isinstance(module, kinds) and module not in tables.values():
                tables[f"{prefix}.weight" if prefix else "weight"] = module
    return tables


def quantized_bytes(bundle: Any, tables: Mapping[str, Any], kept: Mapping[str, int]) -> float:
    """Bytes of the data with every embedding table quantized (torch's per-row uint8) after the
    squash: each table as a bitmask of kept entries + a uint8 per kept entry + an fp32 scale
    and offset per row (or plain uint8 + qparams where smaller); every other tensor dense."""
    from sparsify_exp.quantize import quantize_embedding, sparse_quantized_nbytes

    total = 0
    for name, t in bundle.tensors().items():
        if name not in tables:
            total += t.numel() * t.element_size()
    for name, module in tables.items():
        if module.weight.device.type != "cpu":  # torch quantizes embeddings on the CPU
            module = copy.deepcopy(module).cpu()
        qweight = quantize_embedding(module).weight()  # the table as it would be served
        rows = qweight.q_per_channel_scales().numel()
        entries = kept.get(name, qweight.numel())
        total += sparse_quantized_nbytes(qweight.numel(), rows, entries)
    log.info("sparse + quantized embedding tables: %s in all", human_bytes(total))
    return float(total)


def compacted_rows(sp: Any, names: list[str]) -> dict[str, float]:
    """Rows a row sparsifier kept, and the bytes of its tables compacted to the kept rows plus
    an index remap (what serving the sparsified tables costs)."""
    compact = {n: compact_rows(sp.get_data(n, return_original=True), sp.get_mask(n)) for n in names}
    log.info(
        "rows kept: %s of %s; compacted to kept rows + remap: %s",
        f"{sum(c.num_rows for c in compact.values()):,}",
        f"{sum(c.remap.numel() for c in compact.values()):,}",
        human_bytes(sum(c.nbytes for c in compact.values())),
    )
    return {
        "rows/kept": float(sum(c.num_rows for c in compact.values())),
        "rows/total": float(sum(c.remap.numel() for c in compact.values())),
        "size/row_compacted_bytes": float(sum(c.nbytes for c in compact.values())),
    }
