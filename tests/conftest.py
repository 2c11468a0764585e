"""Shared fixtures: a real sqlite MLflow store per test, migrated once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import warm_cli

REPO = Path(__file__).resolve().parents[1]

# One intra-op thread for torch in every test process and the subprocesses they start: the
# suite runs several xdist workers (and their subprocesses) on a few cores, where OpenMP's
# idle threads spin for a descheduled sibling. Measured on 2 busy cores, one digits training
# run: 35 CPU-s with torch's default threads, 7 with one (scripts/time_tests.sh times the
# whole suite). Set before any test module imports torch; a user's own setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


def cli_env(env: dict | None = None) -> dict[str, str]:
    """This process's environment without the runner's own variables, plus ``env``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSIFY_EXP_")}
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    return full_env


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300):
    """``python -m sparsify_exp *args`` in ``cwd``; returns the CompletedProcess. The process
    is forked from a warm interpreter (tests/warm_cli.py explains why and when not)."""
    return warm_cli.run("sparsify_exp", args, cwd, cli_env(env), timeout=timeout)


def start_cli(args: list[str], cwd: Path, start_new_session: bool = False):
    """``python -m sparsify_exp *args`` started in ``cwd`` (for signals, kills, polling);
    a :class:`subprocess.Popen` or its warm equivalent."""
    return warm_cli.start("sparsify_exp", args, cwd, cli_env(), start_new_session=start_new_session)


@pytest.fixture
def started_cli():
    """``started_cli(args, cwd, **popen)``: a running ``python -m sparsify_exp`` process."""
    return start_cli


@pytest.fixture
def cli():
    """``cli(args, cwd, env=None)``: runs ``python -m sparsify_exp`` in a subprocess."""
    return run_cli


@dataclass
class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite store, proxied artifacts in ``dir``),
    in its own process group so :meth:`kill` takes its uvicorn worker down with it."""

    dir: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.dir / "mlflow.db"

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def start(self, timeout: float = 90.0) -> None:
        """Starts the server on its port and store; returns once ``/health`` answers."""
        import time
        import urllib.request

        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]
        cmd += ["server", "--backend-store-uri", f"sqlite:///{self.db}"]
        cmd += ["--artifacts-destination", str(self.dir / "artifacts")]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.dir / "server.log", "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.dir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "server.log").read_text()[-3000:]
                    self.kill()
                    raise RuntimeError(f"mlflow server did not start:\n{log}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL to the server and its workers (no shutdown: in-flight requests are cut)."""
        import contextlib
        import signal

        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, migrated_db):
    """A running ``mlflow server`` (fresh sqlite store, artifacts served by the server) on a
    free loopback port; stopped at the end. ``kill()`` then ``start()`` restarts it on the
    same port and store."""
    d = tmp_path / "mlflow_server"
    d.mkdir()
    server = MlflowServer(d, free_port())
    shutil.copy(migrated_db, server.db)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)``: a fresh tmpfs of ``size`` (``"2m"``) under ``tmp_path``, for a disk that
    fills; needs root and mount(8) (skipped elsewhere); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        mount_bin = shutil.which("mount")
        if mount_bin is None:
            pytest.skip("no mount(8)")
        done = subprocess.run(
            [mount_bin, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)
