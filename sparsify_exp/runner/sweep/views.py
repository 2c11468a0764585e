"""Pages of MLflow's UI that answer a sweep without clicking: the links the runner prints and a
saved runs-table view per sweep.

A saved view is what the UI's "Views" menu stores: an experiment tag
``mlflow.sharedViewState.<key>`` holding ``{"name", "createdAt", "updatedAt", "state"}`` (the
state a JSON string), opened by ``?viewStateShareKey=<key>`` on the runs page. The runner saves
one per sweep, keyed by the parent run id: the sweep's children (a search filter on
``mlflow.parentRunId``), sorted by sparsity, with the pick marked, the swept params, the quality
headlines, sparsity and size as columns fitted to their headers; and, in its chart mode
(``compareRunsMode=CHART``), a "Trade-off" section: sparsity against each quality headline
(scatter) and parallel coordinates over the swept params and the headlines. The UI cannot
draw a bound line: the parent's ``report/tradeoff.html`` (plotly) does.
``workflowType=machine_learning`` opens the classic runs view rather than the GenAI one MLflow 3
starts in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from sparsify_exp.runner.sweep.summary import SPARSITY

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
CLASSIC_VIEW = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"


def ui_base(uri: str) -> tuple[str, str]:
    """``(base URL of the UI, how to start it)``: a tracking server is its own UI; a local
    store needs ``mlflow ui`` (the second item; empty for a server)."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/"), ""
    return LOCAL_UI, f"mlflow ui --backend-store-uri {uri}"


def _page(uri: str, fragment: str) -> str:
    base, start = ui_base(uri)
    url = f"{base}/#/{fragment}"
    return f"{start}  # then {url}" if start else url


def run_page(uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the classic view (or the command to serve it, then the page)."""
    return _page(uri, f"experiments/{experiment_id}/runs/{run_id}?{CLASSIC_VIEW}")


def view_fragment(experiment_id: str, key: str) -> str:
    return f"experiments/{experiment_id}/runs?viewStateShareKey={quote(key)}&{CLASSIC_VIEW}"


def column(kind: str, key: str) -> str:
    """A runs-table column id as the UI spells it: ``metrics.`_summary/sparsity```."""
    return f"{kind}.`{key}`"


def view_page(uri: str, experiment_id: str, key: str, charts: bool = False) -> str:
    """A saved view's page (its charts with ``charts``), or the command to serve it, then it."""
    return _page(
        uri, view_fragment(experiment_id, key) + ("&compareRunsMode=CHART" if charts else "")
    )


def _width(label: str, values: Sequence[str] = ()) -> int:
    """A column wide enough for its whole header and values (the UI's font: ~7 px a
    character)."""
    return max(80, 7 * max([len(label), *(len(v) for v in values)]) + 24)


def _chart(kind: str, name: str, section: str, **fields: Any) -> dict[str, Any]:
    return {
        "uuid": f"sweep-{kind.lower()}-{name}",
        "type": kind,
        "displayName": name,
        "metricSectionId": section,
        "isGenerated": False,
        "deleted": False,
        "runsCountToCompare": 100,
        **fields,
    }


def tradeoff_charts(
    swept_params: Sequence[str], quality: Sequence[str], size: Sequence[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(charts, sections)`` of the view's chart mode: one "Trade-off" section first, with a
    scatter of sparsity against each quality headline and the size, and parallel coordinates
    over the swept params, sparsity, the headlines and the size."""
    section = "sweep-tradeoff"
    sections = [
        {
            "uuid": section,
            "name": "Trade-off",
            "display": True,
            "isReordered": False,
            "deleted": False,
            "isGenerated": False,
        }
    ]

    def axis(key: str) -> dict[str, str]:
        return {"key": key, "type": "METRIC"}

    charts = [
        _chart(
            "SCATTER",
            f"{key.rsplit('/', 1)[-1]} vs sparsity",
            section,
            xaxis=axis(SPARSITY),
            yaxis=axis(key),
        )
        for key in [*quality, *size[:1]]
    ]
    charts.append(
        _chart(
            "PARALLEL",
            "swept settings -> sparsity, quality, size",
            section,
            selectedParams=list(swept_params),
            selectedMetrics=[SPARSITY, *quality, *size[:1]],
            showAllRuns=True,
        )
    )
    return charts, sections


def save_sweep_view(
    client: Any,
    experiment_id: str,
    parent_run_id: str,
    name: str,
    columns: Sequence[str],
    charts: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None,
    values: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Saves the sweep's view (see the module doc): ``columns`` (column ids, see
    :func:`column`) in this order, each as wide as its header and its ``values`` (by column
    id), and the chart mode's ``(charts, sections)``; returns its key."""
    columns = list(columns)
    state: dict[str, Any] = {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": column("metrics", SPARSITY),
        "orderByAsc": False,
        "lifecycleFilter": "Active",
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": {
            c: _width(c.split(".", 1)[1].strip("`"), (values or {}).get(c, ())) for c in columns
        },
        "runsHiddenMode": "SHOW_ALL",
    }
    if charts is not None:
        state |= {
            "compareRunCharts": charts[0],
            "compareRunSections": charts[1],
            "isAccordionReordered": True,
            "hideEmptyCharts": True,
        }
    now = int(time.time() * 1000)
    envelope = {"name": name[:200], "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + parent_run_id, json.dumps(envelope))
    return parent_run_id
