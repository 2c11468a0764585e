"""MLflow tracking for the runner: one run per job, one parent run per sweep.

Everything goes through an explicit :class:`mlflow.MlflowClient` (no fluent global state), so
runs of parallel sweep workers and of tests never mix. Metrics are buffered and written with
``log_batch`` (about 0.1 ms a metric on sqlite instead of 3.6 ms per ``log_metric`` call).

Tags the runner sets (a report or a query can rely on them):

* ``sparsify.sweep=true`` and ``sparsify.sweep_dir`` on a sweep's parent run;
* ``mlflow.parentRunId`` on each job of a sweep, plus ``sparsify.overrides``;
* ``sparsify.choice.<group>`` (``hydra.runtime.choices``), ``sparsify.evaluators``,
  ``mlflow.source.git.commit`` when the code is in a git checkout;
* ``sparsify.failure`` on a FAILED run: the exception, one line.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

__all__ = [
    "PARENT_ENV",
    "RunTracker",
    "ensure_experiment",
    "find_sweep_runs",
    "find_sweeps",
    "flatten",
    "git_info",
    "metric_key",
    "open_client",
    "resolve_tracking_uri",
]

#: Set by the sweep callback for the jobs it launches: ``<parent run id>|<sweep dir>``.
PARENT_ENV = "SPARSIFY_EXP_PARENT_RUN"

SWEEP_TAG = "sparsify.sweep"
SWEEP_DIR_TAG = "sparsify.sweep_dir"
PARENT_TAG = "mlflow.parentRunId"
FAILURE_TAG = "sparsify.failure"
OVERRIDES_TAG = "sparsify.overrides"
EVALUATORS_TAG = "sparsify.evaluators"
CHOICE_TAG_PREFIX = "sparsify.choice."

SPARSITY_KEY = "sparsity/overall"
DENSE_BYTES_KEY = "size/dense_bytes"
COMPRESSED_BYTES_KEY = "size/compressed_bytes"


def resolve_tracking_uri(configured: str | None, launch_dir: str | os.PathLike) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<launch_dir>/mlflow.db``.

    This is MLflow's own default (``sqlite:///mlflow.db`` in the current directory) made
    absolute, so that a job whose cwd moved (``hydra.job.chdir=true``, a cluster worker) still
    writes to the store of the directory the user launched from.
    """
    if configured:
        return str(configured)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(Path(launch_dir).resolve() / "mlflow.db")


_PREPARED: set[str] = set()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores, ``:memory:``)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def open_client(uri: str | None) -> MlflowClient:
    """An :class:`MlflowClient` for ``uri`` whose store exists with its whole schema.

    MLflow creates and migrates a new sqlite store in whichever process touches it first;
    two processes doing so at once corrupt each other's migration ("duplicate column name",
    "Online migration expected to match one row"). The first use in each process is made
    under a file lock beside the database (``mlflow.db.lock``), so one process migrates and
    the others find the schema complete. MLflow caches the store per URI afterwards.
    """
    uri = uri or mlflow.get_tracking_uri()
    db = sqlite_path(uri)
    if db is None or uri in _PREPARED:
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock, Timeout

    lock = FileLock(str(db) + ".lock", timeout=300)
    try:
        lock.acquire()
    except (OSError, Timeout) as e:  # a read-only folder: nothing can migrate there anyway
        logging.getLogger("sparsify_exp.runner").debug("store lock for %s: %s", db, e)
        return MlflowClient(tracking_uri=uri)
    try:
        client = MlflowClient(tracking_uri=uri)  # builds (and migrates) the store
    finally:
        lock.release()
    _PREPARED.add(uri)
    return client


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing (safe when several processes race)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> ``{"a.b.c": "value"}`` (lists of scalars stay one value)."""
    out: dict[str, str] = {}
    if isinstance(node, Mapping):
        if not node and prefix:
            out[prefix] = "{}"
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(node, (list, tuple)) and any(isinstance(v, (Mapping, list)) for v in node):
        for i, v in enumerate(node):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = "null" if node is None else str(node)
    return out


_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-./ ]")


def metric_key(*parts: str) -> str:
    """A valid MLflow key (letters, digits, ``_ - . / space``); other characters become ``_``."""
    return _BAD_KEY_CHARS.sub("_", "/".join(parts))


def git_info(path: str | os.PathLike) -> dict[str, str]:
    """``mlflow.source.git.commit`` (and ``sparsify.git_dirty``) for the checkout at ``path``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if commit.returncode != 0:
            return {}
        tags = {"mlflow.source.git.commit": commit.stdout.strip()}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if dirty.returncode == 0:
            tags["sparsify.git_dirty"] = "true" if dirty.stdout.strip() else "false"
        return tags
    except (OSError, subprocess.SubprocessError):
        return {}


class RunTracker:
    """Buffers metrics and writes them in batches to one run."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        flush_every: int = 5000,
        flush_seconds: float = 2.0,
    ):
        self.client = client
        self.run_id = run_id
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        """Also flush when this long has passed, so the dashboard follows a long run live."""
        self._metrics: list[Metric] = []
        self._last_flush = time.monotonic()

    @classmethod
    def start(
        cls,
        client: MlflowClient,
        experiment_id: str,
        run_name: str | None,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
    ) -> RunTracker:
        tags = {k: _tag_value(v) for k, v in tags.items()}
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(client, run.info.run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            self._metrics.append(Metric(k, float(v), ts, int(step)))
        if (
            len(self._metrics) >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._metrics:
            batch, self._metrics = self._metrics, []
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        if items:
            self.client.log_batch(self.run_id, params=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, _tag_value(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, error: BaseException, status: str = "FAILED") -> None:
        """Marks the run ``status`` with the reason; whatever was logged stays."""
        try:
            self.flush()
        except Exception:
            self._metrics = []
        reason = failure_reason(error)
        try:
            self.set_tags({FAILURE_TAG: reason})
            self.client.set_tag(
                self.run_id, "mlflow.note.content", f"**{status}**\n\n```\n{reason}\n```"
            )
        finally:
            self.client.set_terminated(self.run_id, status)


def failure_reason(error: BaseException, limit: int = 2000) -> str:
    """``Type: message`` on one line, looking through Hydra's instantiation wrapper."""
    from sparsify_exp.runner.signals import is_stop, stop_reason

    if is_stop(error):
        return stop_reason(error)
    while type(error).__name__ == "InstantiationException" and error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    reason = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def _tag_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 8000 else s[:7997] + "..."


# --------------------------------------------------------------------------- sweeps


def start_sweep_run(
    client: MlflowClient, experiment_id: str, sweep_dir: str, tags: Mapping[str, str]
) -> str:
    """Creates a sweep's parent run (tag ``sparsify.sweep=true``); returns its id."""
    all_tags = {**tags, SWEEP_TAG: "true", SWEEP_DIR_TAG: sweep_dir}
    name = all_tags.pop("mlflow.runName", None) or f"sweep {Path(sweep_dir).name}"
    run = client.create_run(
        experiment_id, run_name=name, tags={k: _tag_value(v) for k, v in all_tags.items()}
    )
    return run.info.run_id


def parent_from_env(sweep_dir: str | None) -> str | None:
    """The parent run id the sweep callback exported, when this job belongs to that sweep."""
    value = os.environ.get(PARENT_ENV, "")
    if "|" not in value:
        return None
    run_id, env_dir = value.split("|", 1)
    if sweep_dir is not None and os.path.abspath(env_dir) != os.path.abspath(sweep_dir):
        return None
    return run_id or None


def find_parent_by_sweep_dir(
    client: MlflowClient, experiment_id: str, sweep_dir: str
) -> str | None:
    """Fallback for jobs on other machines: the RUNNING parent tagged with ``sweep_dir``."""
    sweep_dir = sweep_dir.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = 'true' and tags.`{SWEEP_DIR_TAG}` = '{sweep_dir}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def find_sweep_runs(client: MlflowClient, parent_run_id: str) -> tuple[Any, list[Any]]:
    """``(parent_run, child_runs)`` of a sweep; children sorted by start time.

    Children are the runs of the parent's experiment tagged ``mlflow.parentRunId=<parent>``
    (every status: FINISHED, FAILED, RUNNING).
    """
    parent = client.get_run(parent_run_id)
    children: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        children.extend(page)
        token = page.token
        if not token:
            break
    return parent, children


def find_sweeps(client: MlflowClient, experiment_name: str) -> list[Any]:
    """The parent runs (``sparsify.sweep=true``) of ``experiment_name``, newest first."""
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return []
    return list(
        client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
            order_by=["attributes.start_time DESC"],
        )
    )


def runs_frame(runs: list[Any]) -> pd.DataFrame:
    """Runs laid out as ``mlflow.search_runs(output_format="pandas")`` lays them out: ``run_id``,
    ``status``, ... and one ``metrics.<key>``, ``params.<key>``, ``tags.<key>`` column a key.

    Built here because ``mlflow.search_runs`` only reads the global (fluent) tracking URI; going
    through an explicit client keeps parallel sweeps and tests on their own stores.
    """
    records = [
        {
            "run_id": r.info.run_id,
            "experiment_id": r.info.experiment_id,
            "status": r.info.status,
            "start_time": r.info.start_time,
            "end_time": r.info.end_time,
            **{f"metrics.{k}": v for k, v in r.data.metrics.items()},
            **{f"params.{k}": v for k, v in r.data.params.items()},
            **{f"tags.{k}": v for k, v in r.data.tags.items()},
        }
        for r in runs
    ]
    info = ["run_id", "experiment_id", "status", "start_time", "end_time"]
    return pd.DataFrame(records) if records else pd.DataFrame(columns=info)


def sweep_children_frame(client: MlflowClient, parent_run_id: str) -> pd.DataFrame:
    """The child runs of :func:`find_sweep_runs` as a :func:`runs_frame`, by start time."""
    return runs_frame(find_sweep_runs(client, parent_run_id)[1])


#: Set by the sweep callback for its jobs: the keys the sweep varies, comma-separated.
SWEPT_ENV = "SPARSIFY_EXP_SWEPT_KEYS"

_SHORT_KEYS = {"sparsity_level": "level", "sparse_block_shape": "block"}


def short_key(key: str) -> str:
    """A swept key as a run name shows it: its last segment, with the usual short names."""
    last = key.lstrip("+~").rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    return _SHORT_KEYS.get(last, last)


def short_value(value: str) -> str:
    """``[1,4]`` as ``1x4`` (block shapes), anything else as given."""
    inner = value.strip()
    if inner.startswith("[") and inner.endswith("]") and "[" not in inner[1:-1]:
        parts = [p.strip() for p in inner[1:-1].split(",")]
        if parts and all(p.lstrip("-").isdigit() for p in parts):
            return "x".join(parts)
    return value


def swept_run_name(overrides: Iterable[str], swept: Iterable[str]) -> str:
    """A sweep job's name: only what the sweep varies (``level=0.5 block=1x4``); a swept
    group by its option alone (``nm_2_4 level=0.5``), so the method leads the name."""
    values = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}
    keys = [k.lstrip("+~") for k in swept if k.lstrip("+~") in values]
    groups = [values[k] for k in keys if "." not in k and "/" not in k]
    rest = [f"{short_key(k)}={short_value(values[k])}" for k in keys if "." in k or "/" in k]
    return " ".join(groups + rest)
