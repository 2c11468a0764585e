"""The answer a sweep's parent run gives: which child to pick, by a stated rule.

``sweep.pick`` (conf/config.yaml) names the rule: among the FINISHED children whose metrics
keep within the bounds (``max``: at most, ``min``: at least), the one with the highest
(``mode: max``) or lowest ``metric``. Equal metrics (two block shapes at 50%) go to the
better quality: the bounded metrics in the rule's order (``min`` bounds: higher is better,
then ``max`` bounds: lower is better), then to the child that started first. The default is
"the highest sparsity whose quality stays close to dense". A bound on a metric that no child
logged (an evaluator the sweep did not run) is left out of the rule, and the rule says so; a
child missing a metric that others logged does not meet that bound. A pick at the edge of
what was tried (no finished child went further) says so: the bounds never bit, and the real
limit lies beyond the grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Pick:
    """The picked child (None when no child meets the rule) and the rule, in words."""

    run: Any | None
    rule: str
    candidates: int
    eligible: int
    unused_bounds: list[str] = field(default_factory=list)
    bounds: dict[str, list[Any]] = field(default_factory=dict)
    """The bounds applied: ``{metric: [">=" | "<=", bound]}``."""
    at_edge: str = ""
    """``the highest _summary/sparsity tried: extend the sweep`` when no finished child went
    further than the pick (empty otherwise)."""

    @property
    def name(self) -> str:
        if self.run is None:
            return ""
        return self.run.data.tags.get("mlflow.runName") or self.run.info.run_id


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def pick_child(children: Sequence[Any], spec: Mapping[str, Any]) -> Pick:
    """Applies the rule ``spec`` (``metric``, ``mode``, ``max``, ``min``) to ``children``."""
    metric = str(spec.get("metric") or "_summary/sparsity")
    mode = str(spec.get("mode") or "max")
    finished = [r for r in children if r.info.status == "FINISHED"]
    logged = {k for r in finished for k in r.data.metrics}
    bounds: list[tuple[str, str, float]] = [
        (str(k), ">=", float(v)) for k, v in (spec.get("min") or {}).items()
    ] + [(str(k), "<=", float(v)) for k, v in (spec.get("max") or {}).items()]
    used = [b for b in bounds if b[0] in logged]
    unused = [f"{k} {op} {_fmt(v)}" for k, op, v in bounds if k not in logged]
    rule = f"{'highest' if mode == 'max' else 'lowest'} {metric}"
    if used:
        rule += " with " + ", ".join(f"{k} {op} {_fmt(v)}" for k, op, v in used)

    def meets(run: Any) -> bool:
        m = run.data.metrics
        for key, op, bound in used:
            value = m.get(key, math.nan)
            if not (value <= bound if op == "<=" else value >= bound):  # NaN fails both
                return False
        return math.isfinite(m.get(metric, math.nan))

    eligible = [r for r in finished if meets(r)]
    sign = 1.0 if mode == "max" else -1.0

    def better(run: Any) -> tuple[float, ...]:
        """Larger is better: the metric (to 6 digits, so 0.5 and 0.4999999 tie), then the
        bounded quality metrics, each signed so that the better value is larger."""
        m = run.data.metrics
        quality = [m[k] if op == ">=" else -m[k] for k, op, _ in used]
        return (sign * float(f"{m[metric]:.6g}"), *quality)

    # max() keeps the first of equal keys: children come in start order
    best = max(eligible, key=better) if eligible else None
    edge = ""
    if best is not None and len(finished) > 1:
        reached = [sign * r.data.metrics.get(metric, math.nan) for r in finished]
        if sign * best.data.metrics[metric] >= max(v for v in reached if math.isfinite(v)):
            what = f"{'highest' if mode == 'max' else 'lowest'} {metric.rsplit('/', 1)[-1]}"
            edge = f"the {what} tried: extend the sweep"
    applied = {k: [op, v] for k, op, v in used}
    return Pick(best, rule, len(finished), len(eligible), unused, applied, edge)


def describe(pick: Pick, keys: Sequence[str]) -> str:
    """``level=0.5 (sparsity 50%, fidelity_rel_error 0.31, 2.6 MB (0.24x dense))``, or why
    nothing was picked."""
    from sparsify_exp.runner.sweep.summary import headline

    if pick.run is None:
        if pick.candidates == 0:
            return "nothing: no child finished"
        return f"nothing: no finished child meets the rule ({pick.rule})"
    shown = headline(pick.run.data.metrics, keys)
    answer = f"{pick.name} ({shown})" if shown else pick.name
    return f"{answer}; {pick.at_edge}" if pick.at_edge else answer
