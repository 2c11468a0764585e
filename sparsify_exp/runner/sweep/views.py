"""Pages of MLflow's UI that answer a sweep without clicking: the links the runner prints and a
saved runs-table view per sweep.

A saved view is what the UI's "Views" menu stores: an experiment tag
``mlflow.sharedViewState.<key>`` holding ``{"name", "createdAt", "updatedAt", "state"}`` (the
state a JSON string), opened by ``?viewStateShareKey=<key>`` on the runs page. The runner saves
one per sweep, keyed by the parent run id: the sweep's children (a search filter on
``mlflow.parentRunId``), sorted by sparsity, with the swept params and the ``_summary/`` metrics
as columns. ``workflowType=machine_learning`` opens the classic runs view rather than the
GenAI one MLflow 3 starts in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
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


def save_sweep_view(
    client: Any,
    experiment_id: str,
    parent_run_id: str,
    name: str,
    swept_columns: Sequence[str],
    summary_metrics: Sequence[str],
) -> str:
    """Saves the sweep's runs-table view (see the module doc): ``swept_columns`` (column ids,
    see :func:`column`) then the summary metrics; returns its key."""
    columns = [*swept_columns, *(column("metrics", k) for k in summary_metrics)]
    state = {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": column("metrics", SPARSITY),
        "orderByAsc": False,
        "lifecycleFilter": "Active",
        "selectedColumns": [column("attributes", "Duration"), *columns],
        "columnOrder": columns,
        "columnWidths": dict.fromkeys(columns, 150),
        "runsHiddenMode": "SHOW_ALL",
    }
    now = int(time.time() * 1000)
    envelope = {"name": name[:200], "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + parent_run_id, json.dumps(envelope))
    return parent_run_id
