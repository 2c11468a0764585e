"""Calibration before the first step: the batches through the model once, under
``torch.inference_mode()`` with a progress bar, and each held name's statistics."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from sparsify_exp.calibration import NEEDS, StatsCollector, run_batch

log = logging.getLogger("sparsify_exp.runner")

__all__ = ["Calibrated", "calibrate", "statistic_names"]

_KINDS = {"input_norms": (nn.Linear,), "row_counts": (nn.Embedding, nn.EmbeddingBag)}
_WHAT = {"input_norms": "an nn.Linear", "row_counts": "an nn.Embedding / nn.EmbeddingBag"}


class Calibrated:
    """Statistics per held name (``add_data`` config) and the metrics of the pass."""

    def __init__(self, config: dict[str, dict[str, torch.Tensor]], metrics: dict[str, float]):
        self.config, self.metrics = config, metrics


def statistic_names(model: nn.Module, need: str) -> set[str]:
    """Parameter names the collector gives ``need`` for: weights of the modules it hooks."""
    return {
        f"{prefix}.weight" if prefix else "weight"
        for prefix, module in model.named_modules()
        if isinstance(module, _KINDS[need])
    }


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def check_names(sparsifier: Any, model: nn.Module, names: Iterable[str]) -> list[str]:
    """One problem a need for each held name the model gives no statistics for (a bias, a
    name of another module kind, a name the model does not have)."""
    problems = []
    label = type(sparsifier).__name__
    for need in sparsifier.calibration_needs:
        have = statistic_names(model, need)
        missing = [n for n in names if n not in have]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            problems.append(
                f"sparsifier: {label} needs {need} for every name it holds, but {shown} "
                f"({len(missing)} name(s)) is not the weight of {_WHAT[need]} in the model, so "
                "calibration has no statistics for it; leave it out (data.exclude, or a "
                "per_name rule with skip: true)"
            )
    return problems


def calibrate(
    source: Any, bundle: Any, sparsifier: Any, names: list[str], progress: str = "auto"
) -> Calibrated:
    """Runs ``source``'s batches through ``bundle.model`` once and returns what each of
    ``names`` needs (``sparsifier.calibration_needs``), with ``calibration/seconds`` and
    ``calibration/tokens`` (text) or ``calibration/batches``."""
    from sparsify_exp.runner.config import ConfigError

    needs = tuple(getattr(sparsifier, "calibration_needs", ()))
    assert all(need in NEEDS for need in needs), needs
    if not needs:
        log.info("calibration: %s ranks by data alone; no batches run", type(sparsifier).__name__)
        return Calibrated({}, {})
    model = bundle.model
    if not isinstance(model, nn.Module):
        raise ConfigError(["calibration: the data source has no model to run the batches through"])
    problems = check_names(sparsifier, model, names)
    if problems:
        raise ConfigError(problems)
    t0 = time.perf_counter()
    batches = source.prepare(bundle)
    total = len(batches) if hasattr(batches, "__len__") else None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    bar = _bar(progress, total)
    count = 0
    was_training = model.training
    model.eval()
    try:
        with StatsCollector(model, needs, names) as collector, torch.inference_mode():
            for batch in batches:
                run_batch(model, _to_device(batch, device))
                collector.stats.batches += 1
                count += source.count(batch)
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    stats = collector.stats
    if stats.batches == 0:
        raise ValueError("calibration: the batches source yielded no batch")
    seconds = time.perf_counter() - t0
    metrics = {"calibration/seconds": seconds, f"calibration/{source.unit}": float(count)}
    if source.unit != "batches":
        metrics["calibration/batches"] = float(stats.batches)
    log.info(
        "calibration: %s in %.2f s -> %s for %d name(s)",
        f"{stats.batches} batch(es)"
        + (f", {count:,} {source.unit}" if source.unit != "batches" else ""),
        seconds,
        ", ".join(needs),
        len(names),
    )
    return Calibrated(stats.for_needs(needs), metrics)


def _bar(mode: str, total: int | None) -> Any:
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    if mode != "bar":
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="calibrate", unit="batch")
