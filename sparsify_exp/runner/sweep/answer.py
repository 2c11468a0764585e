"""The answer a sweep's parent run gives when the sweep ends: the pick (metrics, tags, a mark
on the picked child), the rule, and the saved view that shows the trade-off behind it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sparsify_exp.runner.sweep.pick import describe, pick_child
from sparsify_exp.runner.sweep.summary import (
    COMPRESSED_MB,
    COMPRESSED_TO_DENSE,
    QUANTIZED_MB,
    SPARSITY,
    is_summary,
)
from sparsify_exp.runner.sweep.views import column, save_sweep_view, tradeoff_charts, view_fragment

log = logging.getLogger("sparsify_exp.runner")

#: Tag on the picked child (a column of the sweep's view), and its value.
PICKED_TAG = "sparsify.picked"
PICKED = "★ pick"
#: The rule's bounds on the parent, as JSON ``{metric: [">=" | "<=", bound]}`` (for reports).
BOUNDS_TAG = "sparsify.pick_bounds"

_SIZE = (COMPRESSED_MB, COMPRESSED_TO_DENSE, QUANTIZED_MB)


def quality_headlines(keys: Sequence[str]) -> list[str]:
    """The summary keys that say how good a run is: all but sparsity and size."""
    return [k for k in keys if is_summary(k) and k != SPARSITY and k not in _SIZE]


def log_answer(
    client: Any,
    parent_id: str,
    spec: Mapping[str, Any],
    swept: Sequence[str],
    children: list[Any],
) -> tuple[str, str]:
    """Logs the pick and the view on the parent run; returns ``(the pick in words, the
    view's key or "")``."""
    from mlflow.entities import Metric

    pick = pick_child(children, spec)
    rule = pick.rule
    if pick.unused_bounds:
        rule += f" (not logged, so not applied: {'; '.join(pick.unused_bounds)})"
    tags = {"sparsify.pick_rule": rule, BOUNDS_TAG: json.dumps(pick.bounds)}
    keys = sorted({k for r in children for k in r.data.metrics if is_summary(k)})
    if pick.run is not None:
        m = pick.run.data.metrics
        now = int(time.time() * 1000)
        client.log_batch(
            parent_id, metrics=[Metric(k, float(m[k]), now, 0) for k in keys if k in m]
        )
        tags |= {"sparsify.pick": pick.name, "sparsify.pick_run_id": pick.run.info.run_id}
        if pick.at_edge:
            tags["sparsify.pick_note"] = pick.at_edge
        client.set_tag(pick.run.info.run_id, PICKED_TAG, PICKED)
    answer = describe(pick, keys)
    parent = client.get_run(parent_id)
    exp_id = parent.info.experiment_id
    key, links = "", ""
    try:
        key = _save_view(client, exp_id, parent_id, parent.info.run_name, swept, children)
        table = view_fragment(exp_id, key)
        links = (
            f" The trade-off: [every child]({'#/' + table}), "
            f"[charts](#/{table}&compareRunsMode=CHART), "
            "`report/tradeoff.html` (bounds drawn; download and open it)."
        )
    except Exception as e:  # the answer stands without the view
        log.warning("could not save the sweep's view: %s", e)
    tags["mlflow.note.content"] = (
        f"**Pick: {answer}**\n\nRule: {rule} ({pick.eligible} of {pick.candidates} finished "
        f"children meet it). The parent's `_summary/` metrics are the pick's.{links} "
        "The sweep report: `report/sweep_report.md`."
    )
    for name, value in tags.items():
        client.set_tag(parent_id, name, value)
    return answer, key


def _save_view(
    client: Any, exp_id: str, parent_id: str, name: str, swept: Sequence[str], children: list
) -> str:
    keys = sorted({k for r in children for k in r.data.metrics if is_summary(k)})
    quality = quality_headlines(keys)
    size = [k for k in (COMPRESSED_MB, COMPRESSED_TO_DENSE) if k in keys]
    params = [k.lstrip("+~") for k in swept]  # a swept group is logged as a param too
    # the run names already say the swept settings (magnitude level=0.5): the numbers first,
    # so quality, sparsity and size fit the first screen; the swept params as columns after
    columns = [
        column("tags", PICKED_TAG),
        *(column("metrics", k) for k in [*quality, SPARSITY, *size] if k in keys),
        *(column("params", k) for k in params),
    ]
    charts = tradeoff_charts(params, quality, size)
    values = {column("params", k): [r.data.params.get(k, "") for r in children] for k in params}
    values[column("tags", PICKED_TAG)] = [PICKED]
    return save_sweep_view(client, exp_id, parent_id, name, columns, charts, values)
