"""What a run logs at each step: sparsity (overall, min / mean / max over names, per name) and
churn, how many mask entries flipped since the previous step. Each previous mask is kept at
1 bit an entry (a byte-per-entry copy of an 8 GiB table's mask would be 2 GB)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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


#: Summary keys under ``sparsity/``; a name equal to one of them is logged with a trailing ``_``.
SUMMARY_KEYS = ("overall", "min", "mean", "max")


class StepMetrics:
    """Measures the sparsifier after each step: the metrics dict to log, and the last
    per-name sparsity (for the per-name table).

    ``max_name_metrics`` bounds the per-name keys (the dashboard stays usable with thousands
    of names); ``schedule_param`` adds ``schedule/<param>``, the mean scheduled value.
    """

    def __init__(
        self,
        names: Sequence[str],
        numels: Mapping[str, int],
        *,
        max_name_metrics: int,
        schedule_param: str | None = None,
        track_churn: bool = False,
    ) -> None:
        from sparsify_exp.runner.tracking.keys import per_name_key
        from sparsify_exp.runner.tracking.store import metric_key

        self.names = list(names)
        self.numels = dict(numels)
        self.total = sum(self.numels[n] for n in self.names)
        self.schedule_param = schedule_param
        self.schedule_key = metric_key("schedule", schedule_param) if schedule_param else ""
        self.keyed = {
            n: per_name_key("sparsity", n if n not in SUMMARY_KEYS else f"{n}_")
            for n in self.names[:max_name_metrics]
        }
        self.churn = MaskChurn() if track_churn else None
        self.per_name: dict[str, float] = {}
        self.steps_seen = 0

    def scheduled_value(self, sparsifier: Any) -> float | None:
        """The mean of the scheduled key over the names that have it (read before a step)."""
        if not self.schedule_param:
            return None
        groups = sparsifier.data_groups
        values = [
            float(groups[n][self.schedule_param])
            for n in self.names
            if self.schedule_param in groups[n]
        ]
        return sum(values) / len(values) if values else None

    def prime(self, sparsifier: Any) -> None:
        """Remembers the current masks as the previous step's (a resumed run: its next step
        then has churn like any other)."""
        if self.churn is not None:
            for n in self.names:
                self.churn.update(n, sparsifier.get_mask(n))
        self.steps_seen += 1

    def measure(self, sparsifier: Any, scheduled: float | None = None) -> dict[str, float]:
        """This step's metrics: the aggregates first, then per name (MLflow lists a run's
        metrics in the order they were first logged)."""
        per_name: dict[str, float] = {}
        zeros, changed = 0, 0
        self.per_name = {}
        for n in self.names:
            mask = sparsifier.get_mask(n)
            numel = self.numels[n]
            removed = numel - int(mask.count_nonzero())
            zeros += removed
            self.per_name[n] = removed / max(numel, 1)
            if self.churn is not None:
                changed += self.churn.update(n, mask)
            if n in self.keyed:
                per_name[self.keyed[n]] = self.per_name[n]
        values = list(self.per_name.values())
        metrics: dict[str, float] = {}
        metrics["sparsity/overall"] = zeros / max(self.total, 1)
        metrics["sparsity/min"] = min(values)
        metrics["sparsity/mean"] = sum(values) / len(values)
        metrics["sparsity/max"] = max(values)
        if self.churn is not None and self.steps_seen > 0:
            metrics["churn/overall"] = changed / max(self.total, 1)
        if scheduled is not None:
            metrics[self.schedule_key] = scheduled
        self.steps_seen += 1
        return metrics | per_name

    def close(self) -> None:
        """Frees the remembered masks once the steps are done."""
        if self.churn is not None:
            self.churn.clear()
