"""A stopped sweep stops its jobs on every launcher, and a job that outlives its KILLED run
can neither log into it nor flip it back."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from sparsify_exp.runner.tracking.store import RunTracker, ensure_experiment
from sparsify_exp.runner.tracking.tracker import SpoolTracker
from sparsify_exp.runner.tracking.uploader import RunEndedElsewhere

LONG = ["schedule=constant", "schedule.steps=1000000", "eval=[]", "mlflow.mask_images=0"]
LONG += ["output.write_data=false"]


def test_a_job_whose_run_was_killed_elsewhere_stops_and_cannot_flip_it_back(store, tmp_path):
    client = store.client
    up = RunTracker.start(client, ensure_experiment(client, "sparsify_exp"), "job", {})
    tracker = SpoolTracker(up, tmp_path / "spool", uri=store.uri, poll_s=0.05)
    tracker.log_metrics({"m": 1.0}, step=0)
    tracker.flush()
    deadline = time.monotonic() + 10
    while not client.get_metric_history(up.run_id, "m"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client.set_tag(up.run_id, "sparsify.failure", "sweep stopped: SIGTERM: stopped by SIGTERM")
    client.set_terminated(up.run_id, "KILLED")  # what a stopped sweep does to its children
    with pytest.raises(RunEndedElsewhere, match="was ended KILLED by another process"):
        for step in range(1, 1000):  # the job goes on until its flusher notices
            tracker.log_metrics({"m": float(step)}, step=step)
            time.sleep(0.01)
    tracker.finish()  # what a job's end would do: nothing reaches the run
    run = client.get_run(up.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["sparsify.failure"].startswith("sweep stopped")
    assert [m.step for m in client.get_metric_history(up.run_id, "m")] == [0]
    assert not (tmp_path / "spool" / up.run_id).exists()  # no later sync can upload it


def _job_processes(sweep_dir: Path) -> list[int]:
    """Live processes whose command line names the sweep folder (submitit's jobs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(sweep_dir) in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_sigterm_to_a_submitit_local_sweep_stops_its_jobs(store, started_cli):
    sweep_dir = store.dir / "sweep"
    proc = started_cli(
        ["-m", "hydra/launcher=submitit_local", "seed=1,2", f"hydra.sweep.dir={sweep_dir}", *LONG],
        store.dir,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the jobs never stepped"
        stepping = [r for r in store.runs() if "sparsity/overall" in r.data.metrics]
        if len(stepping) == 2:
            break
        time.sleep(0.5)
    assert _job_processes(sweep_dir)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    deadline = time.monotonic() + 30
    while _job_processes(sweep_dir):  # cancelled, not orphaned under PID 1
        assert time.monotonic() < deadline, f"jobs still running: {_job_processes(sweep_dir)}"
        time.sleep(0.5)
    runs = store.runs()
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and {r.info.status for r in runs} == {"KILLED"}
    steps = {
        r.info.run_id: len(store.client.get_metric_history(r.info.run_id, "sparsity/overall"))
        for r in children
    }
    time.sleep(3)  # nothing logs into the KILLED runs any more
    for r in children:
        after = store.client.get_run(r.info.run_id)
        assert after.info.status == "KILLED"
        assert (
            len(store.client.get_metric_history(r.info.run_id, "sparsity/overall"))
            == steps[r.info.run_id]
        )
