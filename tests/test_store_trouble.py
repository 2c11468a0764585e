"""A job folder that fills ends the run FAILED in MLflow even when the spool cannot take its
end, with the path in the reason; an away store is said once, without MLflow's and urllib3's
per-request tracebacks and retry lines."""

from __future__ import annotations

import contextlib
import time

import pytest

LONG = ["eval=[]", "schedule=linear", "schedule.steps=100000", "mlflow.mask_images=0"]
LONG += ["data.tensors=[{name:w,shape:[32,32]}]", "mlflow.flush_timeout_s=3"]


def _fill(folder) -> None:
    """Writes zeros into ``folder`` until its file system has no byte left."""
    import os

    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


def _wait_for_run(store, proc, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no run"
        runs = store.runs()
        if runs and "sparsity/overall" in runs[0].data.metrics:
            return runs[0]
        time.sleep(0.1)


def test_a_job_folder_that_fills_ends_the_run_failed_naming_the_path(store, started_cli, tmpfs):
    disk = tmpfs("8m")
    proc = started_cli([*LONG, f"hydra.run.dir={disk}/run"], store.dir)
    try:
        run = _wait_for_run(store, proc)
        _fill(disk)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()  # the tmpfs can be unmounted whatever happened
        proc.wait()
    assert proc.returncode == 1
    assert "Traceback" not in err
    run = store.client.get_run(run.info.run_id)
    assert run.info.status == "FAILED"  # not left RUNNING
    reason = run.data.tags["sparsify.failure"]
    assert "No space left on device" in reason and str(disk) in reason
    assert "\n" not in reason


@pytest.mark.slow
def test_an_away_server_is_said_once_without_client_noise(mlflow_server, store, started_cli):
    import signal

    proc = started_cli([*LONG, f"mlflow.tracking_uri={mlflow_server.uri}"], store.dir)
    try:
        deadline = time.monotonic() + 120
        while not mlflow_server.client.search_runs(["0", "1"]):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no run"
            time.sleep(0.2)
        mlflow_server.kill()  # connections refused from now on
        time.sleep(8)  # dozens of uploads and heartbeats fail meanwhile
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        err = out + err  # the job's log goes to the console
    finally:
        proc.kill()
        proc.wait()
    assert "Retrying" not in err and "Traceback" not in err, err[-3000:]
    assert "SQLAlchemy" not in err and "urllib3" not in err
    away = [line for line in err.splitlines() if "unreachable" in line]
    assert 1 <= len(away) <= 2, err[-3000:]  # it went away (and was still away at the end)


@pytest.mark.slow
def test_a_store_that_refuses_writes_is_said_once_without_sql_tracebacks(store, started_cli):
    """Another process holds the sqlite file locked for 30 s: every write of the run fails
    after sqlite's wait (MLflow logs a traceback for each); the run says so once, goes on,
    and uploads everything once the store takes writes again."""
    import signal
    import sqlite3

    # still stepping when the lock goes and the SIGTERM comes: ten million steps, metrics of
    # every thousandth (every step's would leave the end a long upload of what the lock held)
    longer = [a.replace("steps=100000", "steps=10000000") for a in LONG]
    proc = started_cli([*longer, "mlflow.flush_timeout_s=120", "mlflow.log_every=1000"], store.dir)
    try:
        _wait_for_run(store, proc)
        blocker = sqlite3.connect(store.dir / "mlflow.db", isolation_level=None, timeout=60)
        blocker.execute("BEGIN EXCLUSIVE")
        time.sleep(30)
        blocker.execute("ROLLBACK")
        blocker.close()
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        err = out + err
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in err and "SQLAlchemy database error" not in err, err[-3000:]
    away = [line for line in err.splitlines() if "unreachable" in line]
    assert len(away) == 1, err[-3000:]
    (run,) = store.runs()
    assert run.info.status == "KILLED", err[-4000:]  # its end went through once the lock was gone
