"""Shared fixtures: a real sqlite MLflow store per test, migrated once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Store:
    """A fresh MLflow sqlite store in the test's directory (which is also the cwd)."""

    dir: Path
    uri: str

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self, experiment: str = "sparsify_exp") -> list:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return list(self.client.search_runs([exp.experiment_id], max_results=1000))


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """One sqlite file with MLflow's schema migrations done (they take ~2 s per new store)."""
    from mlflow.tracking import MlflowClient

    d = tmp_path_factory.mktemp("mlflow_template")
    db = d / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path, migrated_db, monkeypatch) -> Store:
    """``sqlite:///<tmp_path>/mlflow.db`` copied from the migrated template; cwd = tmp_path."""
    db = tmp_path / "mlflow.db"
    shutil.copy(migrated_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SPARSIFY_EXP_PARENT_RUN", raising=False)
    return Store(tmp_path, uri)


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300):
    """``python -m sparsify_exp *args`` in ``cwd``; returns the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSIFY_EXP_")}
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sparsify_exp", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    """``cli(args, cwd, env=None)``: runs ``python -m sparsify_exp`` in a subprocess."""
    return run_cli
