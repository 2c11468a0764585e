"""The ``_summary/`` metrics: the few numbers a user compares across runs, in one chart group
that MLflow shows first.

MLflow groups a run's charts by everything before a key's last ``/`` and orders the groups by
name (code-unit order when a page opens, ``localeCompare`` when it updates); ``_`` sorts before
every lowercase letter in both, so ``_summary`` opens above ``churn``, ``fidelity``, ``size``
and ``sparsity``. Each summary key repeats a detail key the run also logs, in a unit a person
reads (MB, not bytes; compressed / dense, not the inverse; 6 significant digits, so a table
column shows the number whole), so the detail namespace keeps its meaning for scripts and
reports:

==================================  ===========================================================
``_summary/sparsity``               ``sparsity/overall``: fraction of entries zeroed
``_summary/size_mb``                ``size/compressed_bytes`` / 10⁶: bitmask + kept values
``_summary/size_to_dense``          ``size/compressed_to_dense``: compressed / dense bytes
                                    (lower is smaller; 1 = no saving)
``_summary/quantized_mb``           ``size/quantized_bytes`` / 10⁶ (``output.quantize=true``)
``_summary/<evaluator>_<metric>``   each evaluator's headline metrics (``Evaluator.headline``)
==================================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sparsify_exp.runner.tracking.store import metric_key

PREFIX = "_summary"
SPARSITY = f"{PREFIX}/sparsity"
COMPRESSED_MB = f"{PREFIX}/size_mb"
COMPRESSED_TO_DENSE = f"{PREFIX}/size_to_dense"
QUANTIZED_MB = f"{PREFIX}/quantized_mb"

_MB = 1e6

#: detail key -> (summary key, conversion)
FROM_DETAIL: dict[str, tuple[str, Callable[[float], float]]] = {
    "sparsity/overall": (SPARSITY, float),
    "size/compressed_bytes": (COMPRESSED_MB, lambda b: b / _MB),
    "size/compressed_to_dense": (COMPRESSED_TO_DENSE, float),
    "size/quantized_bytes": (QUANTIZED_MB, lambda b: b / _MB),
}


def is_summary(key: str) -> bool:
    return key.startswith(PREFIX + "/")


def _readable(value: float) -> float:
    return float(f"{value:.6g}")


def headline(metrics: Mapping[str, float], keys: Iterable[str] | None = None) -> str:
    """``sparsity 50.0%, fidelity_rel_error 0.3100, 5.87 MB (0.531x dense)``: a run's
    ``_summary/`` numbers in one short phrase (``keys``: the quality keys to show, default
    every summary key the run has)."""
    from sparsify_exp.runner.progress import percent

    fixed = (SPARSITY, COMPRESSED_MB, COMPRESSED_TO_DENSE, QUANTIZED_MB)
    keys = sorted(k for k in metrics if is_summary(k)) if keys is None else list(keys)
    shown = [f"sparsity {percent(metrics[SPARSITY])}"] if SPARSITY in metrics else []
    shown += [
        f"{k.rsplit('/', 1)[-1]} {metrics[k]:.4g}" for k in keys if k in metrics and k not in fixed
    ]
    if COMPRESSED_MB in metrics:
        size = f"{metrics[COMPRESSED_MB]:.4g} MB"
        if COMPRESSED_TO_DENSE in metrics:
            size += f" ({metrics[COMPRESSED_TO_DENSE]:.3g}x dense)"
        shown.append(size)
    return ", ".join(shown)


class Summarizer:
    """Adds the ``_summary/`` keys that a batch of metrics implies."""

    def __init__(self, evaluators: Iterable[Any] = ()) -> None:
        self.evaluators = [ev for ev in evaluators if hasattr(ev, "summary")]

    def __call__(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """``metrics`` with their summary keys in front (MLflow lists a run's metrics in the
        order they were first logged)."""
        out: dict[str, float] = {}
        for key, (summary_key, convert) in FROM_DETAIL.items():
            if key in metrics:
                out[summary_key] = _readable(convert(float(metrics[key])))
        for ev in self.evaluators:
            for short, value in ev.summary(metrics).items():
                out[metric_key(PREFIX, short)] = _readable(float(value))
        return out | dict(metrics)


class SummarizingTracker:
    """A tracker whose ``log_metrics`` also logs the summary keys; the rest passes through."""

    def __init__(self, tracker: Any, summarize: Summarizer) -> None:
        self.tracker, self.summarize = tracker, summarize

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.tracker.log_metrics(self.summarize(metrics), step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tracker, name)
