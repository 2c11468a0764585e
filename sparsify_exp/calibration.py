"""Statistics of a model's inputs over calibration batches, for masks chosen from data.

Weights alone are the wrong signal where a feature or a row matters for what flows through
it: Wanda scores a weight by ``|W_ij| * ||X_j||`` (the L2 norm of input feature ``j`` over the
calibration tokens), and an embedding row that no batch looks up costs nothing to remove.
:class:`StatsCollector` hooks a model's ``nn.Linear`` inputs and ``nn.Embedding`` /
``nn.EmbeddingBag`` lookups while the user's batches run, accumulating in float64 on the
weights' device; the hooks are removed when the ``with`` block ends, even on error.

Statistics are keyed by parameter name (``<module>.weight``, as ``model.named_parameters()``
spells it), and handed to a sparsifier through ``add_data`` config under the key a sparsifier
lists in its ``calibration_needs``::

    stats = collect(model, batches, needs=("input_norms",))
    sp = WandaSparsifier(sparsity_level=0.5)
    for name, weight in model.named_parameters():
        if name in stats.input_sq_sums:
            sp.add_data(name, weight, input_norms=stats.input_norms()[name])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["NEEDS", "CalibrationStats", "StatsCollector", "collect", "run_batch"]

#: the statistics a sparsifier may declare in ``calibration_needs``
NEEDS = ("input_norms", "row_counts")


@dataclass
class CalibrationStats:
    """What the hooks saw, keyed by parameter name.

    * ``input_sq_sums[name]``: float64 ``(in_features,)``, the sum over every token that
      reached the ``nn.Linear`` of ``x_j ** 2``;
    * ``input_tokens[name]``: how many tokens (input rows) those sums cover;
    * ``row_counts[name]``: int64 ``(num_embeddings,)``, how often each row was looked up
      (``padding_idx`` and lookups whose ``per_sample_weights`` is 0 are not counted);
    * ``batches``: batches run through the model.
    """

    input_sq_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    input_tokens: dict[str, int] = field(default_factory=dict)
    row_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0

    def input_norms(self) -> dict[str, torch.Tensor]:
        """``sqrt(sum of x_j**2 / tokens)`` per input feature (float64): the RMS of each
        feature, i.e. Wanda's ``||X_j||_2`` up to one factor per layer, so per-row and
        per-tensor rankings are Wanda's and layers compare on one scale."""
        return {
            name: (sums / max(self.input_tokens.get(name, 0), 1)).sqrt()
            for name, sums in self.input_sq_sums.items()
        }

    def for_needs(self, needs: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """``{parameter name: {config key: statistic}}`` for the keys in ``needs``: what
        ``add_data(name, data, **config)`` takes."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        if "input_norms" in needs:
            for name, norms in self.input_norms().items():
                out.setdefault(name, {})["input_norms"] = norms
        if "row_counts" in needs:
            for name, counts in self.row_counts.items():
                out.setdefault(name, {})["row_counts"] = counts
        return out


def _check_needs(needs: Iterable[str]) -> tuple[str, ...]:
    needs = tuple(needs)
    unknown = [need for need in needs if need not in NEEDS]
    if unknown:
        raise ValueError(f"needs={list(needs)!r}: {unknown[0]!r} is not one of {list(NEEDS)}")
    return needs


def _weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


class StatsCollector:
    """Hooks on ``model``'s modules that accumulate :class:`CalibrationStats` while the
    ``with`` block runs batches through it; removed on exit (error or not).

    Args:
        model: any ``nn.Module``; its ``nn.Linear`` modules feed ``input_norms``, its
            ``nn.Embedding`` / ``nn.EmbeddingBag`` modules ``row_counts``.
        needs: which statistics to collect (a subset of :data:`NEEDS`).
        names: parameter names to collect for (``None``: every such module); a name that is
            not the weight of such a module is a ``ValueError``, before any hook.
    """

    def __init__(
        self,
        model: nn.Module,
        needs: Iterable[str] = NEEDS,
        names: Iterable[str] | None = None,
    ) -> None:
        self.model = model
        self.needs = _check_needs(needs)
        self.names = None if names is None else set(names)
        self.stats = CalibrationStats()
        self._handles: list[Any] = []
        self._targets = self._find_targets()

    def _find_targets(self) -> list[tuple[str, nn.Module]]:
        wanted = []
        for module_name, module in self.model.named_modules():
            name = _weight_name(module_name)
            linear = isinstance(module, nn.Linear) and "input_norms" in self.needs
            table = (
                isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and "row_counts" in self.needs
            )
            if (linear or table) and (self.names is None or name in self.names):
                wanted.append((name, module))
        if self.names is not None:
            missing = sorted(self.names - {name for name, _ in wanted})
            if missing:
                kinds = " or ".join(
                    what
                    for need, what in (
                        ("input_norms", "an nn.Linear"),
                        ("row_counts", "an nn.Embedding/nn.EmbeddingBag"),
                    )
                    if need in self.needs
                )
                raise ValueError(
                    f"names: {missing[0]!r} is not the weight of {kinds} in the model "
                    f"({len(missing)} such name(s)); statistics exist only for those modules"
                )
        return wanted

    def __enter__(self) -> StatsCollector:
        stats = self.stats
        for name, module in self._targets:
            weight = module.weight
            if isinstance(module, nn.Linear):
                stats.input_sq_sums[name] = torch.zeros(
                    module.in_features, dtype=torch.float64, device=weight.device
                )
                stats.input_tokens[name] = 0
                hook = self._linear_hook(name)
            else:
                stats.row_counts[name] = torch.zeros(
                    module.num_embeddings, dtype=torch.int64, device=weight.device
                )
                hook = self._lookup_hook(name)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _linear_hook(self, name: str) -> Callable[..., None]:
        sums = self.stats.input_sq_sums[name]
        tokens = self.stats.input_tokens

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["input"]
            flat = x.detach().reshape(-1, x.shape[-1])
            # per batch in float32 (one fused reduction, no squared copy of the input),
            # across batches in float64 so long runs do not lose small contributions
            sq = torch.linalg.vector_norm(flat, 2, dim=0, dtype=torch.float32).square_()
            sums.add_(sq if sq.device == sums.device else sq.to(sums.device))  # into float64
            tokens[name] += flat.shape[0]

        return hook

    def _lookup_hook(self, name: str) -> Callable[..., None]:
        counts = self.stats.row_counts[name]

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            bound = dict(zip(("input", "offsets", "per_sample_weights"), args, strict=False))
            bound.update(kwargs)
            ids = _counted_ids(module, bound)
            if ids.numel():
                ids = ids.to(counts.device)
                counts.scatter_add_(0, ids, torch.ones_like(ids))  # the fastest of the adds

        return hook


def _counted_ids(module: nn.Module, bound: Mapping[str, Any]) -> torch.Tensor:
    """The row ids one forward call really reads: ``padding_idx`` out, lookups weighted 0
    out, and for ``include_last_offset`` bags the ids past the last offset out."""
    ids = bound["input"].detach()
    weights = bound.get("per_sample_weights")
    offsets = bound.get("offsets")
    if (
        isinstance(module, nn.EmbeddingBag)
        and module.include_last_offset
        and offsets is not None
        and ids.dim() == 1
        and offsets.numel()
    ):
        end = int(offsets[-1])
        ids = ids[:end]
        weights = weights[:end] if weights is not None else None
    ids = ids.reshape(-1).long()
    keep = None
    if weights is not None:
        keep = weights.detach().reshape(-1) != 0
    padding = getattr(module, "padding_idx", None)
    if padding is not None:
        not_pad = ids != padding
        keep = not_pad if keep is None else keep & not_pad
    return ids if keep is None else ids[keep]


def run_batch(model: nn.Module, batch: Any) -> Any:
    """One forward call: a mapping as keyword arguments, a tuple/list as positional ones,
    anything else as the single argument."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def collect(
    model: nn.Module,
    batches: Iterable[Any],
    needs: Iterable[str] = NEEDS,
    names: Iterable[str] | None = None,
    on_batch: Callable[[Any], None] | None = None,
) -> CalibrationStats:
    """Runs ``batches`` through ``model`` once under ``torch.inference_mode()`` and returns
    what :class:`StatsCollector` saw. ``on_batch(batch)`` is called after each batch (a
    progress bar, a token count)."""
    with StatsCollector(model, needs, names) as collector, torch.inference_mode():
        for batch in batches:
            run_batch(model, batch)
            collector.stats.batches += 1
            if on_batch is not None:
                on_batch(batch)
    return collector.stats
