"""Signals end runs honestly: real signals to a real ``python -m sparsify_exp`` process."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from sparsify_exp.runner.tracking.store import find_sweep_runs, find_sweeps

LONG = [
    "schedule=constant",
    "schedule.steps=1000000",
    "eval=[]",
    "mlflow.mask_images=0",
    "output.write_data=false",
]


def _wait_for_stepping(store, proc: subprocess.Popen, runs: int, timeout: float = 90) -> None:
    """Until ``runs`` runs are RUNNING with per-step metrics logged (the steps are going)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        stepping = [
            r
            for r in store.runs()
            if r.info.status == "RUNNING" and "sparsity/overall" in r.data.metrics
        ]
        if len(stepping) >= runs:
            return
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"no {runs} run(s) stepping after {timeout} s")


def test_sigterm_marks_the_run_killed_keeps_its_artifacts_and_exits_143(store, started_cli):
    proc = started_cli(LONG, store.dir, start_new_session=True)
    _wait_for_stepping(store, proc, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "SIGTERM: stopped by SIGTERM"
    (run,) = store.runs()
    assert run.info.status == "KILLED"
    assert run.info.end_time is not None
    assert run.data.tags["sparsify.failure"] == "SIGTERM: stopped by SIGTERM"
    assert len(store.client.get_metric_history(run.info.run_id, "sparsity/overall")) > 0
    artifacts = {a.path for a in store.client.list_artifacts(run.info.run_id)}
    assert {"config", "logs", "error.txt"} <= artifacts


def _sweep_ends_killed(store, started_cli, stop) -> tuple[str, int]:
    proc = started_cli(
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2,3", *LONG],
        store.dir,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    _wait_for_stepping(store, proc, 2)
    stop(proc)
    proc.communicate(timeout=90)
    (parent,) = find_sweeps(store.client, "sparsify_exp")
    parent, children = find_sweep_runs(store.client, parent.info.run_id)
    assert parent.info.status == "KILLED"
    assert len(children) == 2  # the third job never started
    for child in children:
        assert child.info.status == "KILLED"
        assert child.info.end_time is not None
    assert all(r.info.status != "RUNNING" for r in store.runs())
    return parent.data.tags["sparsify.failure"], proc.returncode


@pytest.mark.slow
def test_sigterm_on_a_joblib_sweep_kills_the_parent_and_running_children(store, started_cli):
    reason, code = _sweep_ends_killed(store, started_cli, lambda p: p.send_signal(signal.SIGTERM))
    assert code == 128 + signal.SIGTERM
    assert reason == "SIGTERM: stopped by SIGTERM"


@pytest.mark.slow
def test_ctrl_c_on_a_joblib_sweep_kills_the_parent_and_running_children(store, started_cli):
    reason, code = _sweep_ends_killed(store, started_cli, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert code == 128 + signal.SIGINT
    assert reason == "SIGINT: interrupted (Ctrl-C)"
