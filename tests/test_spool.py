"""The spool: a run's records reach the store in order, survive an unreachable or restarted
tracking server and a killed process, and are uploaded later without duplicates."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import warm_cli
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from sparsify_exp.runner import run_overrides
from sparsify_exp.runner.evaluation import Evaluator
from sparsify_exp.runner.tracking import heartbeat, reachability
from sparsify_exp.runner.tracking import spool as sp
from sparsify_exp.runner.tracking.store import RunTracker, ensure_experiment
from sparsify_exp.runner.tracking.tracker import SpoolTracker
from sparsify_exp.runner.tracking.uploader import Uploader

HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


@pytest.fixture(autouse=True)
def _mlflow_http_defaults(monkeypatch):
    """MLflow's own HTTP retry settings, as a user has them; what ``start_run`` (or
    ``configure_http``) sets in the test's process is undone after the test."""
    for name in HTTP_ENV:
        monkeypatch.delenv(name, raising=False)


def free_port() -> int:
    """A loopback port nothing listens on (a closed port: connections are refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _new_run(client: MlflowClient, name: str = "t") -> RunTracker:
    return RunTracker.start(client, ensure_experiment(client, "sparsify_exp"), name, {})


def _history(client, run_id: str, key: str) -> list[tuple[int, int, float]]:
    return sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id: str, path: str = "") -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path or None):
        out |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def _sync(path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSIFY_EXP_")}
    return warm_cli.run("sparsify_exp.sync", [str(path), *args], os.getcwd(), env, timeout=120)


def _log_some(tracker, tmp: Path, steps: int = 20) -> dict[str, list[float]]:
    """Params, tags, metrics (one NaN) and artifacts, as a job logs them."""
    tracker.log_params({"alpha": 0.5, "name": "x" * 10})
    tracker.set_tags({"owner": "me"})
    logged: dict[str, list[float]] = {"loss": [], "acc": []}
    for step in range(steps):
        values = {"loss": 1 / (step + 1), "acc": math.nan if step == 3 else step / steps}
        tracker.log_metrics(values, step=step)
        for k, v in values.items():
            logged[k].append(v)
    (tmp / "art" / "sub").mkdir(parents=True)
    (tmp / "art" / "a.txt").write_text("a")
    (tmp / "art" / "sub" / "b.bin").write_bytes(os.urandom(2 << 20))  # hard-linked
    tracker.log_artifact(tmp / "art")
    (tmp / "note.log").write_text("log line\n")
    tracker.log_artifact(tmp / "note.log", "logs")
    tracker.log_artifact(tmp / "missing.txt")  # like RunTracker: nothing to log
    return logged


def _assert_logged(client, run_id: str, logged: dict[str, list[float]]) -> None:
    run = client.get_run(run_id)
    assert run.data.params == {"alpha": "0.5", "name": "x" * 10}
    assert run.data.tags["owner"] == "me"
    for key, values in logged.items():
        hist = _history(client, run_id, key)
        assert [s for s, _, _ in hist] == list(range(len(values)))  # once each, no duplicate
        for (_, _, got), want in zip(hist, values, strict=True):
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    assert _artifacts(client, run_id) == {"a.txt", "sub/b.bin", "logs/note.log"}


def test_http_requests_fail_fast_once_configured(monkeypatch):
    """MLflow retries a closed port for minutes by default; a job's process does not."""
    from mlflow.exceptions import MlflowException

    closed = f"http://127.0.0.1:{free_port()}"
    reachability.configure_http("sqlite:///x.db")
    assert all(name not in os.environ for name in HTTP_ENV)  # only for HTTP stores
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")  # the user's choice stays
    reachability.configure_http(closed, request_timeout_s=7)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "33"
    with pytest.raises(MlflowException, match="Connection refused"):
        MlflowClient(tracking_uri=closed).search_experiments()


def test_sql_store_drops_identical_metric_rows(store):
    """What a resend relies on: the SQL store keeps one row per (key, step, timestamp, value)."""
    client = store.client
    run_id = _new_run(client).run_id
    rows = [Metric("m", 0.25, 1000, 1), Metric("m", math.nan, 1000, 2)]
    client.log_batch(run_id, metrics=rows)
    client.log_batch(run_id, metrics=rows)
    client.log_batch(run_id, metrics=[*rows, Metric("m", 0.5, 1000, 1)])
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "m"))
    assert len(hist) == 3  # the two rows once each, plus the different value
    assert hist[0] == (1, 0.25) and hist[1] == (1, 0.5) and math.isnan(hist[2][1])


def test_spool_uploads_exactly_what_was_logged(store, tmp_path):
    client = store.client
    upstream = _new_run(client)
    tracker = SpoolTracker(
        upstream, tmp_path / "job" / "spool", uri=store.uri, heartbeat_s=0.2, poll_s=0.1
    )
    spool_dir = tmp_path / "job" / "spool" / tracker.run_id
    first_beat = int(client.get_run(tracker.run_id).data.tags.get(heartbeat.HEARTBEAT_TAG, 0))
    logged = _log_some(tracker, tmp_path)
    lines = (spool_dir / sp.RECORDS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert [r["kind"] for r in records[:3]] == ["params", "tags", "metrics"]
    time.sleep(1.2)  # a few heartbeats, and the flusher's rounds
    run = client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING"
    assert int(run.data.tags[heartbeat.HEARTBEAT_TAG]) > first_beat
    assert len(client.get_metric_history(tracker.run_id, "loss")) == 20  # uploaded live
    tracker.finish()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert heartbeat.HEARTBEAT_TAG not in run.data.tags  # an ended run has no heartbeat
    assert "sparsify.failure" not in run.data.tags
    _assert_logged(client, tracker.run_id, logged)
    assert not (tmp_path / "job" / "spool").exists()  # all acknowledged: removed
    assert (tmp_path / "art" / "sub" / "b.bin").is_file()  # the job's own files stay


def test_spool_left_behind_is_synced_once(store, tmp_path, caplog):
    """The store away for good: the run goes on, says so once, leaves its spool with the
    command to upload it; ``sync`` uploads it, then again finds nothing to add, and a
    resend of records after the acknowledged offset duplicates nothing."""
    caplog.set_level(logging.INFO, logger="sparsify_exp.runner")
    client = store.client
    run_id = _new_run(client).run_id
    closed = f"http://127.0.0.1:{free_port()}"
    reachability.configure_http(closed)  # as start_run does
    away = RunTracker(MlflowClient(tracking_uri=closed), run_id)
    job = tmp_path / "job"
    tracker = SpoolTracker(
        away, job / "spool", uri=closed, flush_timeout_s=1.0, heartbeat_s=0.2, poll_s=0.1
    )
    logged = _log_some(tracker, tmp_path)  # returns with nothing uploaded: the job goes on
    assert tracker.spool.acked() == (0, 0)
    time.sleep(0.5)
    tracker.fail(RuntimeError("boom: it broke"), "FAILED")  # gives up after flush_timeout_s

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum(f"{closed} unreachable (" in w for w in warnings) == 1, warnings  # once
    kept = [w for w in warnings if "python -m sparsify_exp.sync" in w]
    assert len(kept) == 1 and kept[0].endswith(f"python -m sparsify_exp.sync {job}"), kept
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and not run.data.metrics  # nothing reached the store

    spool_dir = job / "spool" / run_id
    backup = tmp_path / "spool_backup"
    shutil.copytree(spool_dir, backup)

    proc = _sync(job, "--tracking-uri", store.uri)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_records = len((backup / sp.RECORDS_FILE).read_text().splitlines())
    assert f"{n_records} record(s) uploaded" in proc.stdout and "run FAILED" in proc.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["sparsify.failure"] == "RuntimeError: boom: it broke"
    _assert_logged(client, run_id, logged)
    assert not spool_dir.exists()

    proc = _sync(job, "--tracking-uri", store.uri)  # twice: nothing left
    assert proc.returncode == 0 and "nothing to upload" in proc.stdout, proc.stdout

    # An uploader that died after its calls returned, before acknowledging the last half:
    shutil.copytree(backup, spool_dir)
    half = n_records // 2
    offset = sum(
        len(line) for line in (backup / sp.RECORDS_FILE).read_bytes().splitlines(True)[:half]
    )
    (spool_dir / sp.ACK_FILE).write_text(f"{half} {offset}\n")
    proc = _sync(tmp_path, "--tracking-uri", store.uri)  # a folder above: finds the spool
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{n_records - half} record(s) uploaded" in proc.stdout
    _assert_logged(client, run_id, logged)  # the same rows, once each
    assert client.get_run(run_id).info.status == "FAILED"


def test_unreachable_server_at_start_is_a_one_line_error_from_the_health_probe(store):
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        reachability.StoreUnreachable
    ) as err:  # from the health probe, no retry storm
        run_overrides(
            ["data=tensors", "eval=[]", f"mlflow.tracking_uri={closed}", "output.progress=none"],
            output_dir=store.dir / "job",
        )
    message = str(err.value)
    assert message.startswith(f"tracking server {closed} unreachable: ")
    assert "Connection refused" in message and "\n" not in message
    assert not (store.dir / "job" / "spool").exists()


def test_a_refused_record_is_said_once_and_does_not_fail_the_run(store, tmp_path, caplog):
    client = store.client
    tracker = SpoolTracker(_new_run(client), tmp_path / "spool", uri=store.uri, poll_s=0.05)
    tracker.log_params({"lr": 0.1})
    tracker.log_params({"lr": 0.2})  # MLflow refuses to change a param
    tracker.log_params({"lr": 0.3})
    for step in range(3):
        tracker.log_metrics({"m": 1.0}, step=step)
    with caplog.at_level(logging.WARNING, logger="sparsify_exp.runner"):
        tracker.finish()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert run.data.metrics["m"] == 1.0
    assert run.data.tags["sparsify.rejected"].startswith("2 record(s) refused by the store")
    said = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(said) == 1 and "Changing param values is not allowed" in said[0].getMessage()
    rejected = (tmp_path / "spool" / tracker.run_id / sp.REJECTED_FILE).read_text()
    assert '"lr": "0.2"' in rejected and '"lr": "0.3"' in rejected  # kept, with the reason


def test_a_run_taken_for_dead_while_its_store_was_away_is_not(store, tmp_path):
    """Its uploader, back in touch, makes it RUNNING again; or its end clears the reason."""
    client = store.client
    up = _new_run(client)
    exp = client.get_run(up.run_id).info.experiment_id
    client.set_tag(up.run_id, heartbeat.HEARTBEAT_TAG, str(int(time.time()) - 100))
    assert heartbeat.reap_dead_runs(client, exp, stale_s=10) == [up.run_id]
    run = client.get_run(up.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["sparsify.failure"].startswith("process died (last heartbeat ")

    Uploader(sp.Spool(tmp_path), up).revive()
    run = client.get_run(up.run_id)
    assert run.info.status == "RUNNING" and "sparsify.failure" not in run.data.tags

    assert heartbeat.reap_dead_runs(client, exp, stale_s=10) == [up.run_id]
    spool = sp.Spool.create(tmp_path / "spool", up.run_id, tracking_uri=store.uri)
    end = {"seq": 1, "ts": int(time.time() * 1000), "kind": "end", "status": "FINISHED"}
    spool.append(json.dumps(end).encode() + b"\n")
    uploader = Uploader(spool, up)
    assert uploader.step() == 1 and uploader.ended["status"] == "FINISHED"
    run = client.get_run(up.run_id)
    assert run.info.status == "FINISHED" and "sparsify.failure" not in run.data.tags


# --------------------------------------------------------------------------- a real server

_SERVER = None


class KillServerAtStart(Evaluator):
    """Kills the tracking server when the run starts its steps, and starts it again (in the
    background: it takes seconds) so that it comes back while the run goes on. Meanwhile
    another job's start, straight on the server's database, takes the silent run for dead."""

    name = "kill_server"

    def on_start(self, ctx):
        import threading

        _SERVER.kill()
        db = MlflowClient(tracking_uri=f"sqlite:///{_SERVER.db}")
        exp = db.get_experiment_by_name("sparsify_exp").experiment_id
        assert len(heartbeat.reap_dead_runs(db, exp, stale_s=1, now=time.time() + 60)) == 1
        threading.Thread(target=_SERVER.start, daemon=True).start()
        return {}


def test_run_survives_its_server_dying_and_coming_back(mlflow_server, store, caplog):
    global _SERVER
    _SERVER = mlflow_server
    caplog.set_level(logging.INFO, logger="sparsify_exp.runner")
    steps = 300
    rid = run_overrides(
        [
            "data=tensors",
            "schedule=constant",
            f"schedule.steps={steps}",
            "eval=[]",
            f"+eval.kill._target_={__name__}.KillServerAtStart",
            "mlflow.mask_images=0",
            f"mlflow.tracking_uri={mlflow_server.uri}",
            "output.progress=none",
        ],
        output_dir=store.dir / "job",
    )
    client = mlflow_server.client
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert "sparsify.failure" not in run.data.tags  # taken for dead, then alive again
    hist = client.get_metric_history(rid, "sparsity/overall")
    assert sorted(m.step for m in hist) == list(range(steps))
    assert run.data.params["schedule.steps"] == str(steps)
    arts = _artifacts(client, rid)
    assert "config/config.yaml" in arts and "masks/final.safetensors" in arts
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("unreachable (" in w for w in warnings) == 1, warnings  # said once
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert not (store.dir / "job" / "spool").exists()


@pytest.mark.slow
def test_sweep_survives_a_server_restart(mlflow_server, store):
    """8 jobs, 4 at a time, against a real server that is SIGKILLed while the first four
    run and restarted on the same port and store: every job FINISHED, every step there once."""
    steps, levels = 300, [f"0.{i}" for i in range(1, 9)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSIFY_EXP_")}
    env.pop("HYDRA_FULL_ERROR", None)
    env["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    args = [
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=4",
        "data=tensors",
        "schedule=constant",
        f"schedule.steps={steps}",
        "eval=[]",
        "mlflow.mask_images=0",
        "output.progress=none",
        f"sparsifier.sparsity_level={','.join(levels)}",
    ]
    with open(store.dir / "sweep.out", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sparsify_exp", *args],
            cwd=store.dir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            client = mlflow_server.client
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                exp = client.get_experiment_by_name("sparsify_exp")
                runs = client.search_runs([exp.experiment_id]) if exp else []
                children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
                if len(children) >= 4:
                    break
                time.sleep(0.2)
            assert len(children) >= 4, (store.dir / "sweep.out").read_text()[-3000:]
            mlflow_server.kill()
            time.sleep(5)  # long enough that jobs also start while the server is away
            mlflow_server.start()
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = (store.dir / "sweep.out").read_text()
    assert proc.returncode == 0, output[-4000:]
    assert "unreachable" in output  # the jobs said so
    client = mlflow_server.client
    exp = client.get_experiment_by_name("sparsify_exp")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sparsify.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["sparsifier.sparsity_level"] for c in children) == levels
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("sparsify.failure")
        rid = child.info.run_id
        for key in child.data.metrics:
            hist = [(m.step, m.timestamp, m.value) for m in client.get_metric_history(rid, key)]
            assert len(hist) == len(set(hist)), key  # no duplicates
        hist = client.get_metric_history(rid, "sparsity/overall")
        assert sorted(m.step for m in hist) == list(range(steps))
        assert "masks/final.safetensors" in _artifacts(client, rid, "masks")
    assert not list(store.dir.glob("multirun/**/spool"))


# --------------------------------------------------------------------------- heartbeat


def test_killed_run_is_marked_failed_at_the_next_start(store, cli, caplog):
    """``kill -9`` leaves a run RUNNING; the next job's start marks it FAILED (its heartbeat
    stopped) and leaves alone RUNNING runs without a heartbeat or with a fresh one. Its spool
    holds what it logged; ``sync`` uploads the rest."""
    caplog.set_level(logging.INFO, logger="sparsify_exp.runner")
    client = store.client
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSIFY_EXP_")}
    env.pop("HYDRA_FULL_ERROR", None)
    killed_dir = store.dir / "killed"
    proc = warm_cli.start(
        "sparsify_exp",
        [
            "data=tensors",
            "schedule=constant",
            "schedule.steps=10000000",
            "eval=[]",
            "mlflow.heartbeat_s=0.3",
            "output.progress=none",
            f"hydra.run.dir={killed_dir}",
        ],
        store.dir,
        env,
    )
    try:
        deadline = time.monotonic() + 60
        beats: set[str] = set()
        while time.monotonic() < deadline and proc.poll() is None and len(beats) < 3:
            runs = store.runs()
            if runs:
                beats.add(client.get_run(runs[0].info.run_id).data.tags[heartbeat.HEARTBEAT_TAG])
            time.sleep(0.2)
        assert len(beats) >= 3, proc.communicate()[1] if proc.poll() is not None else beats
        proc.kill()  # SIGKILL: no handler, no finally
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (killed,) = store.runs()
    assert client.get_run(killed.info.run_id).info.status == "RUNNING"
    exp_id = killed.info.experiment_id
    no_beat = client.create_run(exp_id, run_name="other tool").info.run_id
    time.sleep(3.5)  # older than the stale bound below
    fresh = client.create_run(  # its heartbeat is younger than the bound at the next start
        exp_id, run_name="alive", tags={heartbeat.HEARTBEAT_TAG: str(int(time.time()) + 1)}
    ).info.run_id

    new = run_overrides(
        [
            "data=tensors",
            "eval=[]",
            "output.progress=none",
            "mlflow.heartbeat_s=0.5",
            "mlflow.heartbeat_stale_s=3",
        ],
        output_dir=store.dir / "next",
    )
    dead = client.get_run(killed.info.run_id)
    assert dead.info.status == "FAILED"
    reason = dead.data.tags["sparsify.failure"]
    assert reason.startswith("process died (last heartbeat 20") and reason.endswith(")")
    assert client.get_run(no_beat).info.status == "RUNNING"
    assert client.get_run(fresh).info.status == "RUNNING"
    assert client.get_run(new).info.status == "FINISHED"
    assert any(
        killed.info.run_id in r.getMessage() and "process died" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )

    # what it logged before the kill is in its spool: sync uploads what had not been sent
    (spool_dir,) = (killed_dir / "spool").iterdir()
    records = [json.loads(x) for x in (spool_dir / sp.RECORDS_FILE).read_text().splitlines()]
    steps = {
        r["step"] for r in records if r["kind"] == "metrics" and "sparsity/overall" in r["values"]
    }
    assert len(steps) > 10
    proc = _sync(killed_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hist = client.get_metric_history(killed.info.run_id, "sparsity/overall")
    assert sorted(m.step for m in hist) == sorted(steps)
    assert client.get_run(killed.info.run_id).info.status == "FAILED"  # stays: it died


def test_a_sweep_job_waits_out_an_outage_at_its_start_and_a_single_run_does_not(caplog):
    import pickle
    import socket
    import threading

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with (
        caplog.at_level("WARNING", logger="sparsify_exp.runner"),
        pytest.raises(reachability.StoreUnreachable),
    ):
        reachability.wait_reachable(uri, wait_s=1.5, timeout_s=0.5)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].endswith("; waiting up to 1.5 s for it"), said
    error = pickle.loads(pickle.dumps(reachability.StoreUnreachable(uri, "refused")))
    assert str(error) == f"tracking server {uri} unreachable: refused"  # crosses processes

    server = socket.socket()  # a listener that answers once it is up, 1 s from now

    def serve() -> None:
        time.sleep(1.0)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        conn, _ = server.accept()
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        reachability.wait_reachable(uri, wait_s=30, timeout_s=2)  # returns once the server answers
    finally:
        thread.join(timeout=5)
        server.close()
