"""The answer a sweep's parent run gives: which child to pick, by a stated rule.

``sweep.pick`` (conf/config.yaml) names the rule: among the FINISHED children whose metrics
keep within the bounds (``max``: at most, ``min``: at least), the one with the highest
(``mode: max``) or lowest ``metric``; ties go to the child that started first. The default
is "the highest sparsity whose quality stays close to dense". A bound on a metric that no
child logged (an evaluator the sweep did not run) is left out of the rule, and the rule says
so; a child missing a metric that others logged does not meet that bound.
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
        (str(k), "<=", float(v)) for k, v in (spec.get("max") or {}).items()
    ] + [(str(k), ">=", float(v)) for k, v in (spec.get("min") or {}).items()]
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
    best = None
    if eligible:
        sign = 1.0 if mode == "max" else -1.0
        # max() keeps the first of equal keys: children come in start order
        best = max(eligible, key=lambda r: sign * r.data.metrics[metric])
    return Pick(best, rule, len(finished), len(eligible), unused)


def describe(pick: Pick, keys: Sequence[str]) -> str:
    """``level=0.5 (sparsity 50%, fidelity_rel_error 0.31, 2.6 MB, 0.24x dense)``, or why
    nothing was picked."""
    from sparsify_exp.runner.progress import percent
    from sparsify_exp.runner.sweep.summary import COMPRESSED_MB, COMPRESSED_TO_DENSE, SPARSITY

    if pick.run is None:
        if pick.candidates == 0:
            return "nothing: no child finished"
        return f"nothing: no finished child meets the rule ({pick.rule})"
    m = pick.run.data.metrics
    shown = [f"sparsity {percent(m[SPARSITY])}"] if SPARSITY in m else []
    fixed = (SPARSITY, COMPRESSED_MB, COMPRESSED_TO_DENSE)
    shown += [f"{k.rsplit('/', 1)[-1]} {m[k]:.4g}" for k in keys if k in m and k not in fixed]
    if COMPRESSED_MB in m:
        shown.append(f"{m[COMPRESSED_MB]:.4g} MB")
    if COMPRESSED_TO_DENSE in m:
        shown.append(f"{m[COMPRESSED_TO_DENSE]:.3g}x dense")
    return f"{pick.name} ({', '.join(shown)})" if shown else pick.name
