"""RowSparsifier: removes whole rows (embedding vectors) of lowest norm or least use;
compact_rows drops them from the table for good."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from sparsify_exp.errors import ConfigValueError
from sparsify_exp.sparsifier import block_ops
from sparsify_exp.sparsifier.base import BaseDataSparsifier, _extract_weight
from sparsify_exp.sparsifier.checks import check_level, check_norm, checked_config
from sparsify_exp.sparsifier.packed_mask import PackedMask
from sparsify_exp.sparsifier.scope import check_scope

__all__ = ["SCORES", "CompactRows", "RowSparsifier", "compact_rows", "row_scores"]

SCORES = ("norm", "usage", "usage_then_norm", "usage_then_last")


def _check_score(value: Any) -> str:
    if value not in SCORES:
        raise ConfigValueError("score", value, f"must be one of: {', '.join(SCORES)}")
    return value


def check_row_counts(value: Any) -> torch.Tensor:
    """A 1-D tensor of non-negative lookup counts (one a row)."""
    what = (
        f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
        if isinstance(value, torch.Tensor)
        else value
    )
    if value is None:
        raise ConfigValueError(
            "row_counts",
            None,
            "score=usage needs how often each row was looked up over calibration data "
            "(sparsify_exp.calibration.collect(...).row_counts[name], or the runner's "
            "calibration group)",
        )
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigValueError("row_counts", what, "must be a 1-D tensor of counts") from None
    if value.dim() != 1 or value.is_complex() or value.dtype == torch.bool:
        raise ConfigValueError("row_counts", what, "must be a 1-D real tensor (one count a row)")
    if bool((value < 0).any()) or bool(value.isnan().any()):
        raise ConfigValueError("row_counts", what, "counts must be >= 0 (and not NaN)")
    return value


def _usage_order(
    counts: torch.Tensor, norms: torch.Tensor | None, last_first: bool = False
) -> torch.Tensor:
    """Row indices, least used first; equal counts by ``norms`` (as :func:`row_scores` ranks
    them: NaN last) when given, else by position (the last rows first with ``last_first``)."""
    if norms is not None:
        prior = torch.sort(norms, stable=True).indices
    elif last_first:
        prior = torch.arange(counts.numel() - 1, -1, -1, device=counts.device)
    else:
        return torch.sort(counts, stable=True).indices
    return prior[torch.sort(counts[prior], stable=True).indices]


def row_scores(data: torch.Tensor, norm: str) -> torch.Tensor:
    """One score a row (``data[i]``; an entry of 1-D data): the sum of ``|x|`` (L1) or of
    ``|x|**2`` (L2) over the row, in float32 (float64 for 64-bit data), computed a chunk of
    rows at a time. A row holding NaN scores NaN; one holding ``+/-inf`` (and no NaN) ``+inf``.
    """
    if data.dim() <= 1:
        return block_ops._magnitude(data.reshape(-1), norm)
    rows = data.shape[0]
    width = data[0].numel()
    work = block_ops.work_dtype(data.dtype)
    scores = torch.empty(rows, dtype=work, device=data.device)
    if width == 0:
        return scores.zero_()
    step = max(1, block_ops.CHUNK_ELEMENTS // width)
    # one buffer for every chunk: a fresh chunk-size tensor each time costs more than the math
    buffer = torch.empty(min(step, rows) * width, dtype=work, device=data.device)
    for start in range(0, rows, step):
        chunk = data[start : start + step]
        values = buffer[: chunk.numel()].view(chunk.shape)
        if chunk.is_complex():
            values.copy_(chunk.abs())
        elif chunk.dtype == work:
            torch.abs(chunk, out=values)
        else:
            values.copy_(chunk).abs_()
        if norm == "L2":
            values.square_()
        torch.sum(values.view(chunk.shape[0], -1), dim=1, out=scores[start : start + step])
    return scores


class RowSparsifier(BaseDataSparsifier):
    r"""Zeroes the ``round(sparsity_level * rows)`` rows of lowest norm (or least use) of each
    data: whole embedding vectors of a table, which :func:`compact_rows` can then drop.

    * ``sparsity_level``: fraction of rows removed, in ``[0, 1]``; a default that
      ``add_data(name, data, sparsity_level=...)`` may override per name.
    * ``norm``: ``"L1"`` (sum of ``|x|``) or ``"L2"`` (its order is that of the 2-norm).
    * ``score``: ``"norm"`` (rows of lowest norm first), ``"usage"`` (rows looked up least
      often first, equal counts by position), ``"usage_then_norm"`` (least used first,
      equal counts by norm: among the rows no batch touched, the smallest go first; trained
      recommendation tables, whose rare rows stay small) or ``"usage_then_last"`` (equal
      counts the last rows first: tokenizer vocabularies, whose ids are in merge or
      frequency order, so later ids are rarer). The
      usage scores need ``row_counts`` in each name's ``add_data`` config, one count a row
      (:attr:`sparsify_exp.calibration.CalibrationStats.row_counts`). On a pretrained word
      table the rows of lowest norm are the most frequent tokens: usage is the signal there.

    A row is ``data[i]``: an embedding's vector, a linear layer's output unit, a convolution's
    filter; 1-D data has one entry a row. The masks of ``torch.nn.utils.prune.ln_structured(...,
    amount=sparsity_level, n=1 or 2, dim=0)`` on data without ties. Exactly that many rows go
    whatever the data holds: rows rank as :class:`DataNormSparsifier` blocks do -- a row
    holding NaN ranks above all, a row holding ``+/-inf`` just below, equal scores by
    position (the first rows go first). A step reads the data once, a chunk of rows at a time;
    its extra memory is one score a row. ``scope="global"`` is not supported.
    """

    def __init__(
        self,
        data_list: Iterable[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        norm: str = "L1",
        scope: str = "local",
        score: str = "norm",
    ) -> None:
        check_level(sparsity_level)
        self.norm = check_norm(norm)
        self.score = _check_score(score)
        self.scope = check_scope(scope, type(self).__name__, has_global=False)
        super().__init__(data_list=data_list, sparsity_level=sparsity_level)

    @property
    def calibration_needs(self) -> tuple[str, ...]:  # type: ignore[override]
        """``("row_counts",)`` for the usage scores: what calibration must provide."""
        return () if self.score == "norm" else ("row_counts",)

    def validate_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        checks: dict[str, Any] = {"sparsity_level": check_level}
        if self.score != "norm" and "row_counts" in config:  # add_data requires them
            checks["row_counts"] = check_row_counts
        return checked_config(name, config, checks)

    def add_data(self, name: str, data: Any, reuse_mask: bool = True, **config: Any) -> Any:
        """As :meth:`BaseDataSparsifier.add_data`; with a usage score, first checks that
        ``row_counts`` has one count a row (nothing is added otherwise)."""
        if self.score != "norm":
            weight = _extract_weight(data)
            base = self.data_groups.get(name, self.defaults) if isinstance(name, str) else {}
            try:
                counts = check_row_counts({**base, **config}.get("row_counts"))
            except ConfigValueError as error:
                raise error.for_name(name) from None
            rows = weight.shape[0] if weight.dim() else 1
            if counts.numel() != rows:
                raise ConfigValueError(
                    "row_counts",
                    f"tensor of shape {tuple(counts.shape)}",
                    f"needs one count a row: {rows} for shape {tuple(weight.shape)}",
                    name=name,
                )
        return super().add_data(name, data, reuse_mask=reuse_mask, **config)

    def _removed(self, data: torch.Tensor, k: int, row_counts: torch.Tensor | None) -> torch.Tensor:
        """``bool`` (rows,): the ``k`` rows this step removes."""
        if self.score == "norm":
            return block_ops.smallest_k(row_scores(data, self.norm), k)
        rows = data.shape[0] if data.dim() else 1
        norms = row_scores(data, self.norm) if self.score == "usage_then_norm" else None
        counts = row_counts.to(data.device)  # type: ignore[union-attr]
        removed = torch.zeros(rows, dtype=torch.bool, device=data.device)
        order = _usage_order(counts, norms, last_first=self.score == "usage_then_last")
        removed[order[:k]] = True
        return removed

    def update_mask(  # type: ignore[override]
        self, name: str, data: torch.Tensor, sparsity_level: float, **kwargs: Any
    ) -> None:
        level = check_level(sparsity_level)
        mask = self.get_mask(name)
        rows = data.shape[0] if data.dim() else 1
        k = round(level * rows)
        if k == 0 or data.numel() == 0:
            mask.fill_(True)
            return
        if k == rows:
            mask.fill_(False)
            return
        keep = self._removed(data, k, kwargs.get("row_counts")).logical_not_()
        mask.copy_(keep.view(rows, *[1] * (data.dim() - 1)).expand(mask.shape))

    def update_packed_mask(  # type: ignore[override]
        self,
        name: str,
        data: torch.Tensor,
        mask: PackedMask,
        sparsity_level: float,
        **kwargs: Any,
    ) -> None:
        """The step into a packed mask: the row scores (4 bytes a row) in one pass, then
        the rows' bits a chunk of rows at a time."""
        level = check_level(sparsity_level)
        rows = data.shape[0] if data.dim() else 1
        k = round(level * rows)
        if k in (0, rows) or data.numel() == 0:
            mask.fill_(k == 0 or data.numel() == 0)
            return
        keep = self._removed(data, k, kwargs.get("row_counts")).logical_not_()
        width = data.numel() // rows
        step = max(1, block_ops.CHUNK_ELEMENTS // width)
        flat = mask.reshape(-1)
        for start in range(0, rows, step):
            chunk = keep[start : start + step]
            flat.write(start * width, chunk[:, None].expand(chunk.numel(), width).reshape(-1))


class CompactRows(NamedTuple):
    """A table without its removed rows: ``rows[remap[i]]`` is old row ``i`` when
    ``remap[i] >= 0``; ``remap[i] == -1`` marks a removed row (it read as zeros).

    Lookups: ``new = remap[ids]``, then ``rows[new.clamp(min=0)] * (new >= 0)[..., None]``.
    """

    rows: torch.Tensor
    remap: torch.Tensor

    @property
    def num_rows(self) -> int:
        """Rows kept."""
        return int(self.rows.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the compacted table: the kept rows and the index remap."""
        return self.rows.numel() * self.rows.element_size() + (
            self.remap.numel() * self.remap.element_size()
        )


def compact_rows(
    weight: Any, mask: torch.Tensor, index_dtype: torch.dtype = torch.int64
) -> CompactRows:
    """The rows of ``weight`` (a tensor, parameter or embedding) that ``mask`` keeps, and the
    index remap from old rows to new ones.

    ``mask`` is a row mask (``(rows,)``) or a mask of ``weight``'s shape, e.g.
    ``RowSparsifier.get_mask(name)``: a row is kept when any of its entries is, and a kept row
    keeps only its kept entries (the others become 0), so lookups through the remap read what
    the masked table held. ``index_dtype`` (int64 or int32) is the remap's dtype.
    """
    table = _extract_weight(weight).detach()
    if table.dim() == 0:
        raise ValueError("compact_rows needs data with rows (at least one dimension)")
    if index_dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index_dtype must be torch.int64 or torch.int32; got {index_dtype}")
    rows = table.shape[0]
    mask = torch.as_tensor(mask, device=table.device)
    full = tuple(mask.shape) == tuple(table.shape)
    if not full and tuple(mask.shape) != (rows,):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} fits neither the rows ({rows},) nor the "
            f"table's shape {tuple(table.shape)}"
        )
    mask = mask != 0 if mask.dtype != torch.bool else mask
    kept = mask.reshape(rows, -1).any(1) if full and table.dim() > 1 else mask.reshape(rows)
    index = kept.nonzero().squeeze(1)
    compact = table.index_select(0, index)
    if full and table.dim() > 1:
        row_mask = mask.index_select(0, index)
        if not bool(row_mask.all()):
            compact.mul_(row_mask)
    remap = torch.full((rows,), -1, dtype=index_dtype, device=table.device)
    remap[index] = torch.arange(index.numel(), dtype=index_dtype, device=table.device)
    return CompactRows(compact, remap)
