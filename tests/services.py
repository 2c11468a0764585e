"""Real services for cluster tests and the launcher benchmark: a Ray head node on loopback and
the PostgreSQL + mlflow tracking server of ``scripts/tracking_server.sh``. Each stops only
the processes it started."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: With it Ray takes 127.0.0.1 as the node's address (a one-node cluster on loopback); without
#: it Ray swaps a loopback ``--node-ip-address`` for the machine's network address.
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _venv_exe(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.is_file() else name


@dataclass
class RayHead:
    """``ray start --head --block`` in its own session; :meth:`stop` ends that session."""

    address: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path

    def stop(self) -> None:
        """SIGTERM to ``ray start`` (it stops what it started), then SIGKILL to whatever of
        its session is left."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(log: Path, num_cpus: int = 2, timeout: float = 90.0) -> RayHead:
    """A one-node Ray cluster on 127.0.0.1 with ``num_cpus`` CPUs; returns once it serves."""
    # Short: Ray's socket paths under it must fit in 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    env = {**os.environ, **RAY_LOOPBACK_ENV}
    env.pop("RAY_ADDRESS", None)
    cmd = [_venv_exe("ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    cmd += ["--port", str(port), "--num-cpus", str(num_cpus), "--include-dashboard", "false"]
    cmd += ["--disable-usage-stats", "--temp-dir", str(temp_dir)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=temp_dir, start_new_session=True
        )
    head = RayHead(f"127.0.0.1:{port}", proc, temp_dir, log)
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            head.stop()
            raise RuntimeError(f"ray start failed:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return head


@contextlib.contextmanager
def ray_head(log: Path, num_cpus: int = 2) -> Iterator[RayHead]:
    head = start_ray_head(log, num_cpus)
    try:
        yield head
    finally:
        head.stop()


@dataclass
class TrackingServer:
    """``scripts/tracking_server.sh`` on free loopback ports, its state in ``dir``."""

    dir: Path
    pg_port: int
    port: int

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, command: str, timeout: float = 180) -> subprocess.CompletedProcess:
        env = {**os.environ, "TRACKING_DIR": str(self.dir), "PG_PORT": str(self.pg_port)}
        env.update(MLFLOW_PORT=str(self.port), HOST="127.0.0.1", MLFLOW_WORKERS="2")
        return subprocess.run(
            ["bash", str(REPO / "scripts" / "tracking_server.sh"), command],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@contextlib.contextmanager
def tracking_server() -> Iterator[TrackingServer]:
    """A running PostgreSQL-backed ``mlflow server``, stopped and deleted at the end. Its
    folder is under /tmp with every user's traverse bit: as root, PostgreSQL runs as
    ``postgres``, which must reach its data folder."""
    base = Path(tempfile.mkdtemp(prefix="tracking", dir="/tmp"))
    base.chmod(0o755)
    server = TrackingServer(base / "server", free_port(), free_port())
    try:
        started = server.script("start")
        if started.returncode != 0:
            raise RuntimeError(f"tracking_server.sh start failed:\n{started.stderr[-3000:]}")
        assert f"MLFLOW_TRACKING_URI={server.uri}" in started.stdout, started.stdout
        yield server
    finally:
        server.script("stop", timeout=120)
        shutil.rmtree(base, ignore_errors=True)
