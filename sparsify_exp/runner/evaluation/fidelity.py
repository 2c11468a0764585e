"""``fidelity``: how much of each tensor the mask kept, with no task needed.

For data ``W`` and mask ``M`` (1 keeps an entry):

* ``rel_error``   = ‖W - W⊙M‖ / ‖W‖  (Frobenius; 0 for a mask that keeps everything)
* ``energy_kept`` = ‖W⊙M‖² / ‖W‖²    (= 1 - rel_error², since the two parts are disjoint)

With training between steps (``ctx.extras["training"]``), ``W`` is the dense data as it was
before the first step (copied in ``on_start``: 1x the data in memory), and ``W⊙M`` the trained,
masked data: ``rel_error`` is how far training and the mask moved the data together, and
``energy_kept`` may exceed 1.

Both are logged overall (every name pooled, so large tensors weigh by their size) and per
name, up to ``max_names`` names (default: the runner's ``mlflow.max_name_metrics``; the rest
only go to ``per_name.csv`` and the ``fidelity.csv`` artifact, which list every name).
Computed in ``on_masked``, where the original data and the masks both exist, in float64, in
row chunks so a large table needs little extra memory.
"""

from __future__ import annotations

import csv
import math

import torch

from sparsify_exp.runner.evaluation.base import EvalContext, Evaluator, Metrics

_CHUNK_ENTRIES = 1 << 22  # ~4M entries a chunk: bounded temporaries for any table size


def energies(data: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """``(total, kept)``: the sums of squares of all entries and of the kept entries."""
    if data.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != data shape {tuple(data.shape)}")
    flat = data.detach().reshape(-1)
    keep = mask.detach().reshape(-1)
    total = kept = 0.0
    for start in range(0, flat.numel(), _CHUNK_ENTRIES):
        chunk = flat[start : start + _CHUNK_ENTRIES].to(torch.float64, copy=True)
        sq = chunk.square_()  # chunk is a float64 copy: square it in place
        total += float(sq.sum())
        kept += float(sq.mul_(keep[start : start + _CHUNK_ENTRIES]).sum())
    return total, kept


def _moved(dense: torch.Tensor, data: torch.Tensor, mask: torch.Tensor) -> tuple[float, ...]:
    """``(‖W0‖², ‖W⊙M‖², ‖W0 - W⊙M‖²)`` for the dense start ``W0`` and trained data ``W``."""
    w0 = dense.reshape(-1).double()
    wm = data.detach().reshape(-1).double() * mask.reshape(-1)
    return float(w0.square().sum()), float(wm.square().sum()), float((w0 - wm).square().sum())


def _ratios(total: float, kept: float, lost: float) -> tuple[float, float]:
    """``(rel_error, energy_kept)`` from ‖W‖², ‖W⊙M‖² and ‖W - W⊙M‖²."""
    if total == 0.0:  # all-zero data: nothing can be lost
        return 0.0, 1.0
    return math.sqrt(max(lost, 0.0) / total), max(kept / total, 0.0)


class FidelityEvaluator(Evaluator):
    """Relative reconstruction error and L2 energy kept, overall and per name."""

    name = "fidelity"
    headline = ("rel_error",)

    def __init__(self, max_names: int | None = None, write_table: bool = True) -> None:
        if max_names is not None and max_names < 0:
            raise ValueError(f"max_names={max_names}: must be >= 0")
        self.max_names = max_names
        self.write_table = write_table

    def on_start(self, ctx: EvalContext) -> Metrics:
        self._dense: dict[str, torch.Tensor] = {}
        if ctx.extras.get("training"):  # training moves the data: keep what it was
            sp = ctx.sparsifier
            self._dense = {
                n: sp.get_data(n, return_original=True).detach().clone() for n in sp.data_groups
            }
        return {}

    def on_masked(self, ctx: EvalContext) -> Metrics:
        sp = ctx.sparsifier
        dense = getattr(self, "_dense", {})
        rows = []
        grand = [0.0, 0.0, 0.0]  # ‖W‖², ‖W⊙M‖², ‖W - W⊙M‖²
        for name in sp.data_groups:
            data, mask = sp.get_data(name, return_original=True), sp.get_mask(name)
            if name in dense:
                parts = _moved(dense[name], data, mask)
            else:
                total, kept = energies(data, mask)
                parts = (total, kept, total - kept)
            grand = [g + p for g, p in zip(grand, parts, strict=True)]
            rows.append((name, *_ratios(*parts)))
        rel, frac = _ratios(*grand)
        metrics: Metrics = {
            f"{self.name}/rel_error": rel,
            f"{self.name}/energy_kept": frac,
        }
        if rows:
            metrics[f"{self.name}/rel_error_max"] = max(r[1] for r in rows)
        metrics.update(self.per_name_metrics(ctx, "rel_error", {n: r for n, r, _ in rows}))
        metrics.update(self.per_name_metrics(ctx, "energy_kept", {n: f for n, _, f in rows}))
        if self.write_table and rows:
            ctx.artifacts_dir.mkdir(parents=True, exist_ok=True)
            with open(ctx.artifacts_dir / f"{self.name}.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["name", "rel_error", "energy_kept"])
                writer.writerows(rows)
        return metrics
