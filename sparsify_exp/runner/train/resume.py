"""``resume=<run id or job dir>``: continue a stopped run from its last checkpoint, in the same
MLflow run and job folder. The run must not have FINISHED, its job folder must hold a
checkpoint (``checkpoint.every``), and any override given with ``resume=`` must agree with the
config the run was started with (which is what the resumed job uses)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sparsify_exp.atomic import atomic_write_text
from sparsify_exp.runner.context import job_folder_busy
from sparsify_exp.runner.tracking import store as tr
from sparsify_exp.runner.train import checkpoint

RUN_FILE = "mlflow_run.json"
"""Written in the job folder when its run starts: the run id and the tracking URI."""
CONFIG_FILE = Path("artifacts") / "config" / "config.yaml"


@dataclass
class Resumed:
    job_dir: Path
    run_id: str
    uri: str
    config: dict[str, Any]


def write_run_file(job_dir: Path, run_id: str, uri: str) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job_dir / RUN_FILE, json.dumps({"run_id": run_id, "tracking_uri": uri}))


def locate(target: str, uri: str) -> Resumed:
    """The job folder, run and saved config of ``target``; ``ValueError`` with one line."""
    job_dir = Path(target).expanduser()
    if job_dir.is_dir():
        if not (job_dir / RUN_FILE).is_file():
            raise ValueError(f"{job_dir} is not a job folder (no {RUN_FILE})")
        info = json.loads((job_dir / RUN_FILE).read_text())
        run_id, uri = info["run_id"], info["tracking_uri"]
    else:
        from mlflow.exceptions import MlflowException

        try:
            run = tr.open_client(uri).get_run(target)
        except MlflowException:
            raise ValueError(f"no such run or job folder (store: {uri})") from None
        run_id = target
        job_dir = Path(run.data.tags.get("sparsify.job_dir", ""))
    if not (job_dir / CONFIG_FILE).is_file():
        raise ValueError(f"the run's job folder {job_dir} has no {CONFIG_FILE}")
    config = OmegaConf.to_container(OmegaConf.load(job_dir / CONFIG_FILE))
    return Resumed(job_dir, run_id, uri, config)  # type: ignore[arg-type]


def problems(target: str, uri: str, overrides: list[str], composed: Mapping) -> list[str]:
    """Why ``resume=target`` cannot go on, one line each (empty when it can)."""

    key = f"resume={target}"
    try:
        found = locate(target, uri)
    except ValueError as e:
        return [f"{key}: {e}"]
    busy = job_folder_busy(found.job_dir)  # first: the holder may be writing to the store
    if busy:
        return [
            f"{key}: job folder {found.job_dir} is in use ({busy}); wait for that process "
            "to end or stop it"
        ]
    status = tr.open_client(found.uri).get_run(found.run_id).info.status
    if status == "FINISHED":
        return [f"{key}: run {found.run_id} FINISHED; there is nothing to resume"]
    if checkpoint.load(found.job_dir) is None:
        return [
            f"{key}: no checkpoint in {found.job_dir} (runs write one every checkpoint.every steps)"
        ]
    out = []
    for override in overrides:
        name = override.lstrip("+~").split("=", 1)[0]
        if name == "resume" or name.startswith("hydra."):
            continue
        given, saved = (
            OmegaConf.select(OmegaConf.create(dict(composed)), name, default=None),
            (OmegaConf.select(OmegaConf.create(found.config), name, default=None)),
        )
        if _plain(given) != _plain(saved):
            out.append(f"{key}: {name}={given} differs from the run's {name}={saved}")
    return out


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


class SkipLogged:
    """A resumed run recomputes the steps after its checkpoint: a metric is not logged at a
    step its key already reached in the store. The check is per key, as a process can be
    killed between one metric of a step (``train/loss``) and the next (``sparsity/overall``)."""

    def __init__(self, tracker: Any, logged: Mapping[str, int]) -> None:
        self.tracker, self.logged = tracker, dict(logged)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}
        if fresh:
            self.tracker.log_metrics(fresh, step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tracker, name)


def last_logged_steps(tracker: Any) -> dict[str, int]:
    """The last step of each metric the run's store has."""
    client = tracker.upstream.client
    keys = client.get_run(tracker.run_id).data.metrics
    return {
        key: max((m.step for m in client.get_metric_history(tracker.run_id, key)), default=-1)
        for key in keys
    }
