"""WandaSparsifier: weights scored by ``|W_ij| * ||X_j||``, activation-aware (Sun et al. 2023)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from sparsify_exp.errors import ConfigValueError
from sparsify_exp.sparsifier.base import BaseDataSparsifier, _extract_weight
from sparsify_exp.sparsifier.block_ops import CHUNK_ELEMENTS, work_dtype
from sparsify_exp.sparsifier.checks import check_level
from sparsify_exp.sparsifier.mask import flat_keep
from sparsify_exp.sparsifier.nm import _check_m, _check_n, _keep_largest
from sparsify_exp.sparsifier.scope import GlobalScopeMixin, check_scope
from sparsify_exp.sparsifier.select import (
    Cut,
    KeySource,
    apply_cut,
    key_dtype_for,
    magnitude_keys,
    select_and_write,
)

__all__ = ["WandaSparsifier", "wanda_scores"]

COMPARES = ("row", "tensor")
_WORK = {torch.int32: torch.float32, torch.int64: torch.float64}


def _check_compare(value: Any) -> str:
    if value not in COMPARES:
        raise ConfigValueError("compare", value, f"must be one of: {', '.join(COMPARES)}")
    return value


def _describe(value: Any) -> Any:
    """A short stand-in for a tensor in an error message."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return value


def check_input_norms(value: Any) -> torch.Tensor:
    """A 1-D real tensor of non-negative (or NaN) per-input-feature norms."""
    if value is None:
        raise ConfigValueError(
            "input_norms",
            None,
            "WandaSparsifier needs the L2 norm of each input feature over calibration data "
            "(sparsify_exp.calibration.collect(...).input_norms()[name], or the runner's "
            "calibration group)",
        )
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigValueError(
                "input_norms", _describe(value), "must be a 1-D tensor of numbers"
            ) from None
    if value.dim() != 1 or value.is_complex() or value.dtype == torch.bool:
        raise ConfigValueError("input_norms", _describe(value), "must be a 1-D real tensor")
    if not value.is_floating_point():
        value = value.double()
    if bool((value < 0).any()):
        raise ConfigValueError(
            "input_norms", _describe(value), "must be >= 0 (norms of input features)"
        )
    return value


def _columns(shape: torch.Size) -> int:
    """Entries of a row (``data[0]``): the input features of an ``nn.Linear`` weight."""
    return int(torch.Size(shape[1:]).numel())


def wanda_scores(
    data: torch.Tensor, input_norms: torch.Tensor, rows: slice | None = None
) -> torch.Tensor:
    """``|data[rows]| * input_norms`` as ``(rows, columns)``, in float32 (float64 for 64-bit
    data): the score Wanda ranks. NaN data scores NaN (kept last); ``+/-inf`` scores ``+inf``
    (NaN where the feature's norm is 0)."""
    work = work_dtype(data.dtype)
    part = data if rows is None else data[rows]
    part = part.reshape(part.shape[0], -1)
    scores = part.abs()  # a new tensor; complex data by its magnitude
    scores = scores.to(work) if scores.dtype != work else scores
    scores = scores.contiguous()  # abs keeps the data's strides; rows are ranked as views
    return scores.mul_(input_norms.to(device=data.device, dtype=work))


def _row_chunks(data: torch.Tensor) -> Iterator[slice]:
    rows = data.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, _columns(data.shape)))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


class ScoreKeys(KeySource):
    """The keys of Wanda scores in row-major order, computed a chunk of rows at a time."""

    def __init__(self, data: torch.Tensor, input_norms: torch.Tensor, key_dtype: torch.dtype):
        self.data = data
        self.norms = input_norms
        self.numel = data.numel()
        self.key_dtype = key_dtype
        self.device = data.device
        self.columns = _columns(data.shape)

    def keys_at(self, positions: torch.Tensor) -> torch.Tensor:
        data = self.data
        if data.is_contiguous():
            picked = data.reshape(-1)[positions]
        else:
            picked = data[torch.unravel_index(positions, data.shape)]
        columns = positions % self.columns
        work = _WORK[self.key_dtype]
        values = picked.abs().to(work) * self.norms.to(self.device, work)[columns]
        return magnitude_keys(values, self.key_dtype)

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        work = _WORK[self.key_dtype]
        for rows in _row_chunks(self.data):
            scores = wanda_scores(self.data, self.norms, rows).to(work)
            yield rows.start * self.columns, magnitude_keys(scores.reshape(-1), self.key_dtype)


class WandaSparsifier(GlobalScopeMixin, BaseDataSparsifier):
    r"""Zeroes the weights of lowest ``|W_ij| * ||X_j||``: a weight matters as much as the
    input feature it multiplies (Wanda, Sun et al. 2023, "A Simple and Effective Pruning
    Approach for Large Language Models").

    Each name needs ``input_norms`` in its ``add_data`` config: one norm per input feature
    (``data[0].numel()`` of them; an ``nn.Linear`` weight's ``in_features``), any common
    factor apart -- :meth:`sparsify_exp.calibration.CalibrationStats.input_norms` gives them.

    * ``sparsity_level``: fraction removed, in ``[0, 1]`` (unstructured: ``m`` unset).
    * ``n``, ``m``: N:M instead -- in every group of ``m`` consecutive input columns of a row
      the ``n`` of highest score are kept (``n=2, m=4``: the 2:4 pattern of sparse tensor
      cores); ``sparsity_level`` is then unused. ``m`` must divide the columns.
    * ``compare``: ``"row"`` (the paper's choice: each output row loses
      ``int(sparsity_level * columns)`` entries, rounded down as the paper's code and
      llmcompressor's ``WandaPruningModifier`` do) or ``"tensor"`` (the data loses
      ``round(sparsity_level * numel)``, as :class:`MagnitudeSparsifier`).
    * ``scope``: ``"global"`` ranks every name's scores together under one threshold (needs
      ``compare="tensor"``, unstructured and one ``sparsity_level`` for all names). Norms
      from :meth:`~sparsify_exp.calibration.CalibrationStats.input_norms` (feature RMS) put
      layers on one scale.

    Ranking is ``torch.sort``'s: finite scores first, then ``+inf``, then NaN (removed last);
    equal scores by position, the first removed first -- the masks of a stable sort, and
    llmcompressor's on data without ties. Scores are float32 (float64 for 64-bit data),
    computed a chunk of rows at a time. ``sparsity_level`` follows schedules as the other
    sparsifiers do.
    """

    calibration_needs = ("input_norms",)

    def __init__(
        self,
        data_list: Iterable[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        n: int | None = None,
        m: int | None = None,
        compare: str = "row",
        scope: str = "local",
    ) -> None:
        check_level(sparsity_level)
        self.compare = _check_compare(compare)
        self.scope = check_scope(scope, type(self).__name__, has_global=True)
        _check_nm(n, m)
        if self.scope == "global" and (self.compare != "tensor" or m is not None):
            raise ConfigValueError(
                "scope",
                scope,
                "WandaSparsifier ranks names together only unstructured with "
                "compare=tensor (per-row and N:M masks are defined within a row)",
            )
        super().__init__(data_list=data_list, sparsity_level=sparsity_level, n=n, m=m)

    def validate_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        try:
            config["sparsity_level"] = check_level(config.get("sparsity_level"))
            config["n"], config["m"] = _check_nm(config.get("n"), config.get("m"))
            if "input_norms" in config:  # add_data requires them; a bare config may lack them
                config["input_norms"] = check_input_norms(config["input_norms"])
        except ConfigValueError as error:
            raise error.for_name(name) from None
        return config

    def add_data(self, name: str, data: Any, reuse_mask: bool = True, **config: Any) -> Any:
        """As :meth:`BaseDataSparsifier.add_data`; first checks that the data has rows, that
        ``input_norms`` has one norm per column and that groups of ``m`` tile the columns
        (nothing is added otherwise)."""
        weight = _extract_weight(data)
        base = self.data_groups.get(name, self.defaults) if isinstance(name, str) else {}
        merged = {**base, **{k: v for k, v in config.items() if k != "mask"}}
        try:
            norms = check_input_norms(merged.get("input_norms"))
        except ConfigValueError as error:
            raise error.for_name(name) from None
        if weight.dim() < 2:
            raise ConfigValueError(
                "input_norms",
                _describe(norms),
                f"WandaSparsifier needs data with rows and columns (an nn.Linear weight); "
                f"{name!r} has shape {tuple(weight.shape)}",
                name=name,
            )
        columns = _columns(weight.shape)
        if norms.numel() != columns:
            raise ConfigValueError(
                "input_norms",
                _describe(norms),
                f"needs one norm per input column: {columns} for shape {tuple(weight.shape)}",
                name=name,
            )
        m = merged.get("m")
        if isinstance(m, int) and not isinstance(m, bool) and m >= 1 and columns % m:
            raise ConfigValueError(
                "m",
                m,
                f"does not divide the {columns} columns of {tuple(weight.shape)}: N:M groups "
                "are m consecutive input columns",
                name=name,
            )
        return super().add_data(name, data, reuse_mask=reuse_mask, **config)

    def update_mask(  # type: ignore[override]
        self,
        name: str,
        data: torch.Tensor,
        sparsity_level: float,
        input_norms: torch.Tensor,
        n: int | None = None,
        m: int | None = None,
        global_cut: Cut | None = None,
        **kwargs: Any,
    ) -> None:
        mask = self.get_mask(name)
        with flat_keep(mask) as keep:
            if global_cut is not None:
                source = ScoreKeys(data, input_norms, global_cut.key_dtype)
                apply_cut(source, global_cut, keep)
            elif m is not None:
                self._nm(data, input_norms, int(n), int(m), keep)  # type: ignore[arg-type]
            elif self.compare == "tensor":
                source = ScoreKeys(data, input_norms, key_dtype_for(data.dtype))
                select_and_write(source, round(check_level(sparsity_level) * data.numel()), keep)
            else:
                self._per_row(data, input_norms, check_level(sparsity_level), keep)

    @staticmethod
    def _per_row(data: torch.Tensor, norms: torch.Tensor, level: float, keep: torch.Tensor) -> None:
        columns = _columns(data.shape)
        removed = int(level * columns)  # rounded down, as the paper's code and llmcompressor
        if removed <= 0 or data.numel() == 0:
            keep.fill_(True)
            return
        if removed >= columns:
            keep.fill_(False)
            return
        rows = keep.view(-1, columns)
        for part in _row_chunks(data):
            scores = wanda_scores(data, norms, part)
            order = torch.sort(scores, dim=1, stable=True).indices[:, :removed]
            out = rows[part]
            out.fill_(True)
            out.scatter_(1, order, False)

    @staticmethod
    def _nm(data: torch.Tensor, norms: torch.Tensor, n: int, m: int, keep: torch.Tensor) -> None:
        if data.numel() == 0 or n in (0, m):
            keep.fill_(n == m)
            return
        scratch: dict[str, torch.Tensor] = {}
        columns = _columns(data.shape)
        rows = keep.view(-1, columns)
        for part in _row_chunks(data):
            scores = wanda_scores(data, norms, part)
            out = rows[part]
            _keep_largest(scores.view(-1, m), n, out.reshape(-1, m), scratch)

    def _global_keys(
        self, name: str, data: torch.Tensor, config: dict[str, Any], key_dtype: torch.dtype
    ) -> KeySource:
        return ScoreKeys(data, config["input_norms"], key_dtype)


def _check_nm(n: Any, m: Any) -> tuple[int | None, int | None]:
    """``(n, m)``: both unset (unstructured) or an N:M pattern."""
    if n is None and m is None:
        return None, None
    if m is None:
        raise ConfigValueError("m", m, "must be set with n (n of every m columns are kept)")
    checked_m = _check_m(m)
    if n is None:
        raise ConfigValueError("n", n, f"must be set with m={checked_m}")
    return _check_n(n, checked_m), checked_m
