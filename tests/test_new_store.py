"""Processes started together on a sqlite store that does not exist yet: one of them creates
and migrates it, the others wait for it; every run exists, every sweep job has its parent."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import warm_cli
from mlflow.tracking import MlflowClient

SMALL = ["sparsifier=first_row", "data=embeddings", "eval=[]", "mlflow.mask_images=0"]


def _env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSIFY_EXP_")}
    env.pop("HYDRA_FULL_ERROR", None)
    return {**env, "MLFLOW_TRACKING_URI": uri}


def _start(args: list[str], cwd: Path, uri: str) -> subprocess.Popen:
    return warm_cli.start("sparsify_exp", args, cwd, _env(uri))


def _runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sparsify_exp")
    return list(client.search_runs([exp.experiment_id], max_results=100)) if exp else []


def test_three_runs_started_together_on_a_new_store_all_finish(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    (tmp_path / "new").mkdir()
    procs = [
        _start([*SMALL, f"hydra.run.dir={tmp_path / f'job{i}'}"], tmp_path, uri) for i in range(3)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "duplicate column" not in err and "Traceback" not in err
    runs = _runs(uri)
    assert len(runs) == 3
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert (tmp_path / "new" / "mlflow.db.lock").exists()  # the lock the migration took


@pytest.mark.slow
def test_two_sweeps_started_together_on_a_new_store_keep_their_parents(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    (tmp_path / "new").mkdir()
    procs = [
        _start(
            ["-m", *SMALL, "seed=1,2", f"hydra.sweep.dir={tmp_path / f'sweep{i}'}"], tmp_path, uri
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "could not create the sweep's parent run" not in err
    runs = _runs(uri)
    parents = [r for r in runs if r.data.tags.get("sparsify.sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 4
    parent_ids = {p.info.run_id for p in parents}
    for parent in parents:  # each sweep's own two jobs, each sweep reported and closed
        mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert len(mine) == 2
        assert parent.info.status == "FINISHED"
        assert parent.data.tags.get("sparsify.jobs_finished") == "2"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == parent_ids
