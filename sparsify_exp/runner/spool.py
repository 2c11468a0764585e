"""Durable tracking: everything a run logs goes to a spool in its job folder first, and a
background thread uploads it to the MLflow store, in order.

A job keeps running at full speed when the tracking server is away (restarted, unreachable):
the flusher says so once, retries with backoff and catches up when the store is back. At the
end the job waits ``mlflow.flush_timeout_s`` for the store; if it is still away, the spool
stays and ``python -m sparsify_exp.sync <job dir>`` uploads it later. Unlike MLflow's own
async logging (an in-memory queue), nothing is lost when the process dies: each record is
written to the spool file before the call returns.

The spool of one run, ``<job dir>/spool/<run id>/``:

* ``run.json``: the run id, the tracking URI, the experiment, the job folder;
* ``records.jsonl``: one JSON record a line, append-only, fsync'd by the flusher before each
  upload round: ``{"seq": 7, "kind": "metrics", "ts": <ms>, "step": 3, "values": {...}}``,
  ``"params"`` and ``"tags"`` (``values``), ``"artifact"`` (``path`` of a snapshot under
  ``artifacts/``, ``artifact_path``), and last ``"end"`` (``status``, ``reason``);
* ``artifacts/a<n>/``: a snapshot of each logged file or folder (hard links for big files);
* ``acked``: ``<seq> <byte offset>`` of the last record the store acknowledged (its call
  returned). Uploads resume after it, so nothing is sent twice by one uploader; resending
  after a crash between a call and its acknowledgement is harmless (identical metric rows
  are de-duplicated by the SQL stores' primary key, a param re-logged with the same value
  is accepted, tags and artifacts are overwritten);
* ``rejected.jsonl``: records the store refused for good (a bad key, a changed param);
* ``lock``: held (``flock``) by the process uploading the spool.

The spool is deleted once its last record (the run's end) is acknowledged. The run's
terminal status is set by that last record, so only after everything before it was uploaded.

While a run is RUNNING its flusher refreshes the tag ``sparsify.heartbeat`` (unix seconds);
:func:`reap_dead_runs` marks RUNNING runs with a stale heartbeat FAILED ("process died").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sparsify_exp.runner import tracking as tr

__all__ = [
    "HEARTBEAT_TAG",
    "Spool",
    "SpoolTracker",
    "StoreRejected",
    "StoreUnreachable",
    "Uploader",
    "check_reachable",
    "configure_http",
    "reap_dead_runs",
]

log = logging.getLogger("sparsify_exp.runner")

HEARTBEAT_TAG = "sparsify.heartbeat"
NOTE_TAG = "mlflow.note.content"
PROCESS_DIED = "process died"
SPOOL_DIR = "spool"
SYNC_MODULE = "sparsify_exp.sync"

RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
ACK_FILE = "acked"
REJECTED_FILE = "rejected.jsonl"
LOCK_FILE = "lock"
ARTIFACTS_DIR = "artifacts"

#: Metrics sent in one ``log_batch`` call (the client splits it into requests of 1000).
METRICS_PER_CALL = 5000
#: Bytes of records read from the spool at a time.
READ_CHUNK = 4 << 20
#: Files at least this big are snapshot as hard links (when the file system allows).
LINK_FROM_BYTES = 1 << 20
#: Longest pause between two attempts to reach an unreachable store.
MAX_BACKOFF_S = 5.0


class StoreUnreachable(ConnectionError):
    """The tracking server cannot be reached (refused, timed out, reset)."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"tracking server {uri} unreachable: {reason}")

    def __reduce__(self) -> tuple:  # crosses process boundaries (sweep workers) intact
        return (type(self), (self.uri, self.reason))


class StoreRejected(RuntimeError):
    """The tracking store refused a record for good (a bad key or value, a changed param)."""


class _Transient(Exception):
    """An upload failed for a reason that may pass (connection, timeout, 5xx, locked db)."""

    def __init__(self, cause: BaseException):
        self.cause = cause
        super().__init__(short_reason(cause))


# --------------------------------------------------------------------------- errors


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def short_reason(error: BaseException) -> str:
    """What went wrong, in a few words (``[Errno 111] Connection refused``, ``timed out``)."""
    text = " ".join(str(error).split())
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if errno:
        return errno.group(0).strip()
    lowered = text.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return "no answer in time (timed out)"
    if "remotedisconnected" in lowered or "connection aborted" in lowered:
        return "connection closed by the server"
    if "connection reset" in lowered:
        return "connection reset"
    text = text or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _is_connection_error(error: BaseException) -> bool:
    """The store could not be reached at all (as opposed to answering with an error)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, (requests.ConnectionError, requests.Timeout, ConnectionError)):
        return True
    return isinstance(error, MlflowException) and "API request to" in str(error)


def is_transient(error: BaseException) -> bool:
    """Whether an upload that raised ``error`` may succeed later.

    MLflow errors carry an HTTP status: a 4xx (a bad key or value, a missing run) is
    permanent, except 408/429; everything else (5xx, connection refused, timeouts, a locked
    sqlite file, a full disk) is worth retrying.
    """
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return not (400 <= status < 500) or status in (408, 429)
    if isinstance(error, requests.HTTPError) and error.response is not None:
        status = error.response.status_code
        return not (400 <= status < 500) or status in (408, 429)
    return not isinstance(error, (TypeError, ValueError, KeyError, AttributeError))


# --------------------------------------------------------------------------- start of a run


def configure_http(uri: str, request_timeout_s: float = 10) -> None:
    """Makes MLflow's HTTP requests fail fast (no retries inside the client: the flusher
    retries with its own backoff), unless the user set these variables.

    MLflow reads ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (default 7, with backoff factor 2: about
    4 minutes on a closed port) and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (default 120 s) from the
    environment at each request, for every client of the process.
    """
    if not _is_http(uri):
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(request_timeout_s))))


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raises :class:`StoreUnreachable` when an HTTP tracking server does not answer.

    Any HTTP answer counts (``/health`` may be missing behind a proxy); only a refused,
    reset or timed-out connection does not.
    """
    if not _is_http(uri):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as e:
        raise StoreUnreachable(uri, short_reason(e)) from e


def wait_reachable(uri: str, wait_s: float, timeout_s: float = 5.0) -> None:
    """:func:`check_reachable`, retried for up to ``wait_s`` seconds (a sweep's job that
    starts during an outage waits for the server instead of failing); says so once."""
    deadline = time.monotonic() + wait_s
    warned = False
    while True:
        try:
            check_reachable(uri, timeout_s)
            return
        except StoreUnreachable as e:
            if time.monotonic() >= deadline:
                raise
            if not warned:
                log.warning("%s; waiting up to %g s for it", e, wait_s)
                warned = True
            time.sleep(1.0)


@contextlib.contextmanager
def unreachable_as_error(uri: str) -> Iterator[None]:
    """Turns a connection failure of an HTTP store into :class:`StoreUnreachable`."""
    try:
        yield
    except StoreUnreachable:
        raise
    except Exception as e:
        if _is_http(uri) and _is_connection_error(e):
            raise StoreUnreachable(uri, short_reason(e)) from e
        raise


def iso_time(unix_s: float) -> str:
    """``2026-11-25T17:48:10+01:00``: local time with its offset."""
    return datetime.fromtimestamp(unix_s).astimezone().isoformat(timespec="seconds")


def _delete_tags(client: Any, run_id: str, *keys: str) -> None:
    """Deletes tags; one already gone is no error (a retried round may delete it twice)."""
    from mlflow.exceptions import MlflowException

    for key in keys:
        try:
            client.delete_tag(run_id, key)
        except MlflowException as e:
            if e.get_http_status_code() != 404:
                raise


def _failure_tags(status: str, reason: str) -> dict[str, str]:
    return {tr.FAILURE_TAG: reason, NOTE_TAG: f"**{status}**\n\n```\n{reason}\n```"}


def reap_dead_runs(
    client: Any, experiment_id: str, stale_s: float, now: float | None = None
) -> list[str]:
    """Marks FAILED the RUNNING runs of ``experiment_id`` whose ``sparsify.heartbeat`` tag is
    older than ``stale_s`` seconds (their process died without ending them); returns their ids.

    Runs without the tag (a sweep's parent run, runs of other tools) are left alone.
    """
    from mlflow.entities import RunTag

    now = time.time() if now is None else now
    reaped: list[str] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string="attributes.status = 'RUNNING'",
            max_results=1000,
            page_token=token,
        )
        for run in page:
            try:
                beat = float(run.data.tags[HEARTBEAT_TAG])
            except (KeyError, ValueError):
                continue
            if now - beat <= stale_s:
                continue
            reason = f"{PROCESS_DIED} (last heartbeat {iso_time(beat)})"
            tags = [RunTag(k, v) for k, v in _failure_tags("FAILED", reason).items()]
            client.log_batch(run.info.run_id, tags=tags)
            client.set_terminated(run.info.run_id, "FAILED", end_time=int(beat * 1000))
            log.warning(
                "run %s (%s) was RUNNING without a heartbeat since %s: marked FAILED (%s)",
                run.info.run_id,
                run.info.run_name,
                iso_time(beat),
                PROCESS_DIED,
            )
            reaped.append(run.info.run_id)
        token = page.token
        if not token:
            return reaped


# --------------------------------------------------------------------------- the files


def _snapshot_file(src: str, dst: str) -> str:
    """Hard-links a big file (instant, no extra space), copies a small one (a log still
    being appended to is captured as it is now)."""
    if os.path.getsize(src) >= LINK_FROM_BYTES:
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass
    return shutil.copy2(src, dst)


class Spool:
    """The files of one run's spool (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"Spool({str(self.path)!r})"

    @classmethod
    def create(cls, root: str | os.PathLike, run_id: str, **info: Any) -> Spool:
        """A new spool for ``run_id`` under ``root`` (``<job dir>/spool``)."""
        spool = cls(Path(root) / run_id)
        spool.path.mkdir(parents=True, exist_ok=False)
        (spool.path / ARTIFACTS_DIR).mkdir()
        body = {"run_id": run_id, "created": time.time(), **info}
        with open(spool.path / RUN_FILE, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        spool._fd = os.open(spool.records, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return spool

    @staticmethod
    def find(path: str | os.PathLike) -> list[Spool]:
        """The spools of a job folder, of every job under a sweep folder, or ``path`` itself."""
        p = Path(path)
        if (p / RUN_FILE).is_file():
            return [Spool(p)]
        return [Spool(f.parent) for f in sorted(p.glob(f"**/{SPOOL_DIR}/*/{RUN_FILE}"))]

    @property
    def records(self) -> Path:
        return self.path / RECORDS_FILE

    def info(self) -> dict[str, Any]:
        return json.loads((self.path / RUN_FILE).read_text())

    # ---- writing (the job's thread)

    def append(self, line: bytes) -> None:
        assert self._fd is not None, "spool not open for writing"
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]

    def fsync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.fsync(fd)
            os.close(fd)

    def snapshot(self, src: Path, name: str) -> str:
        """Copies ``src`` (a file, or a folder's contents) into the spool; returns the
        snapshot's path relative to the spool."""
        rel = f"{ARTIFACTS_DIR}/{name}"
        dst = self.path / rel
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_snapshot_file)
            return rel
        dst.mkdir()
        _snapshot_file(str(src), str(dst / src.name))
        return f"{rel}/{src.name}"

    # ---- acknowledgements

    def acked(self) -> tuple[int, int]:
        """``(seq, byte offset)`` of the last acknowledged record (``(0, 0)``: none)."""
        try:
            seq, offset = (self.path / ACK_FILE).read_text().split()
            return int(seq), int(offset)
        except (FileNotFoundError, ValueError):
            return 0, 0

    def set_acked(self, seq: int, offset: int) -> None:
        tmp = self.path / f"{ACK_FILE}.tmp"
        tmp.write_text(f"{seq} {offset}\n")
        os.replace(tmp, self.path / ACK_FILE)

    def reject(self, record: Mapping[str, Any], error: str) -> None:
        with open(self.path / REJECTED_FILE, "a") as f:
            f.write(json.dumps({"error": error, "record": record}) + "\n")

    def read(self, offset: int, max_bytes: int = READ_CHUNK) -> list[tuple[dict[str, Any], int]]:
        """Complete records after byte ``offset``: ``[(record, end offset)]`` (a last line
        without its newline, being written or cut by a crash, is left for later)."""
        try:
            with open(self.records, "rb") as f:
                f.seek(offset)
                data = f.read(max_bytes)
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) == max_bytes:  # one record longer than a chunk
                return self.read(offset, max_bytes * 4)
            return []
        out = []
        pos = offset
        for line in data[: end + 1].splitlines(keepends=True):
            pos += len(line)
            try:
                out.append((json.loads(line), pos))
            except ValueError:
                log.error("spool %s: unreadable record at byte %d skipped", self.path, pos)
                out.append(({"kind": "unreadable", "line": line.decode(errors="replace")}, pos))
        return out

    def size(self) -> int:
        try:
            return self.records.stat().st_size
        except FileNotFoundError:
            return 0

    def pending(self) -> int:
        """Records not acknowledged yet."""
        _, offset = self.acked()
        try:
            with open(self.records, "rb") as f:
                f.seek(offset)
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    # ---- ownership

    def lock(self) -> bool:
        """Takes the spool's lock (non-blocking); False when another uploader holds it.
        Held until :meth:`unlock` or the process ends."""
        if self._lock_fd is not None:
            return True
        try:
            import fcntl
        except ImportError:  # no flock (Windows): single uploader assumed
            return True
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)

    def remove(self) -> None:
        """Deletes the spool (and ``<job dir>/spool`` when it is left empty)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self.unlock()
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()


# --------------------------------------------------------------------------- uploading


def _group_end(items: list[tuple[dict[str, Any], int]], i: int) -> int:
    """End of the group starting at ``i``: consecutive records of one kind sent in one call
    (metrics up to :data:`METRICS_PER_CALL` values; params up to a key seen twice, so that
    the store judges a changed value); artifacts and the end alone."""
    kind = items[i][0].get("kind")
    if kind not in ("metrics", "params", "tags"):
        return i + 1
    j, n, keys = i, 0, set()
    while j < len(items) and items[j][0].get("kind") == kind:
        values = items[j][0].get("values") or {}
        n += len(values)
        if j > i and kind == "metrics" and n > METRICS_PER_CALL:
            break
        if kind == "params":
            if keys & values.keys():
                break
            keys |= values.keys()
        j += 1
    return j


def _split(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A metrics/params/tags record as one record a value (to find the one the store refuses)."""
    values = record.get("values") or {}
    if record.get("kind") not in ("metrics", "params", "tags") or len(values) < 2:
        return [record]
    return [{**record, "values": {k: v}} for k, v in values.items()]


class Uploader:
    """Sends a spool's records after the acknowledged offset to the store, in order, and
    acknowledges each call that returned.

    :meth:`step` raises :class:`_Transient` when the store is away (what was acknowledged
    stays acknowledged); a record the store refuses for good is written to
    ``rejected.jsonl``, counted in :attr:`rejected`, and skipped.
    """

    def __init__(self, spool: Spool, upstream: tr.RunTracker):
        self.spool = spool
        self.upstream = upstream
        self.seq, self.offset = spool.acked()
        self.applied = 0
        """Records acknowledged by this uploader."""
        self.rejected: list[str] = []
        self.ended: dict[str, Any] | None = None
        """The end record, once applied."""
        self.last_record: dict[str, Any] | None = None
        self.maybe_reaped = True
        """Whether the run may have been marked dead meanwhile (checked at its end); a live
        flusher clears it while it keeps the heartbeat going."""
        self.progress_at = time.monotonic()
        """When the store last acknowledged something."""

    @property
    def run_id(self) -> str:
        return self.upstream.run_id

    def behind(self) -> bool:
        return self.spool.size() > self.offset

    def step(self, stop: threading.Event | None = None) -> int:
        """Uploads the next chunk of records; returns how many were acknowledged (0: none
        were waiting)."""
        items = self.spool.read(self.offset)
        done = 0
        i = 0
        while i < len(items):
            if stop is not None and stop.is_set():
                break
            j = _group_end(items, i)
            self._apply_group([r for r, _ in items[i:j]])
            record, end = items[j - 1]
            self._ack(record, end, j - i)
            done += j - i
            i = j
        return done

    def _ack(self, record: Mapping[str, Any], offset: int, n: int) -> None:
        self.seq = int(record.get("seq", self.seq))
        self.offset = offset
        self.spool.set_acked(self.seq, offset)
        self.applied += n
        self.progress_at = time.monotonic()
        self.last_record = dict(record)

    def _apply_group(self, group: list[dict[str, Any]]) -> None:
        try:
            self._apply(group)
            return
        except Exception as e:
            if is_transient(e):
                raise _Transient(e) from e
            if len(group) == 1 and len(_split(group[0])) == 1:
                self._reject(group[0], e)
                return
        for record in group:  # find what the store refuses; the rest goes on
            for part in _split(record):
                try:
                    self._apply([part])
                except Exception as e:
                    if is_transient(e):
                        raise _Transient(e) from e
                    self._reject(part, e)

    def _reject(self, record: dict[str, Any], error: BaseException) -> None:
        reason = f"{type(error).__name__}: {short_reason(error)}"
        self.spool.reject(record, reason)
        self.rejected.append(reason)
        if record.get("kind") == "end":
            self.ended = {**record, "rejected": reason}
        log.error(
            "the tracking store refused record %s of run %s (%s; kept in %s): %s",
            record.get("seq"),
            self.run_id,
            record.get("kind"),
            self.spool.path / REJECTED_FILE,
            reason,
        )

    def _apply(self, group: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        kind = group[0].get("kind")
        up = self.upstream
        if kind == "metrics":
            metrics = [
                Metric(k, float(v), int(r["ts"]), int(r["step"]))
                for r in group
                for k, v in r["values"].items()
            ]
            up.client.log_batch(up.run_id, metrics=metrics)
        elif kind == "params":
            up.log_params({k: v for r in group for k, v in r["values"].items()})
        elif kind == "tags":
            up.set_tags({k: v for r in group for k, v in r["values"].items()})
        elif kind == "artifact":
            (record,) = group
            up.log_artifact(self.spool.path / record["path"], record.get("artifact_path"))
        elif kind == "end":
            (record,) = group
            self._apply_end(record)
        else:
            raise ValueError(f"unknown spool record {group[0]!r}")

    def _apply_end(self, record: dict[str, Any]) -> None:
        up = self.upstream
        status, reason = str(record["status"]), record.get("reason")
        if self.rejected and status == "FINISHED":
            status = "FAILED"
            reason = (
                f"StoreRejected: the tracking store refused {len(self.rejected)} record(s) "
                f"(first: {self.rejected[0]})"
            )
        if self.maybe_reaped and not reason:  # marked dead while away? it was not
            stale = up.client.get_run(up.run_id).data.tags.get(tr.FAILURE_TAG, "")
            if stale.startswith(PROCESS_DIED):
                _delete_tags(up.client, up.run_id, tr.FAILURE_TAG, NOTE_TAG)
        if reason:
            up.set_tags(_failure_tags(status, str(reason)))
        up.client.set_terminated(up.run_id, status, end_time=int(record["ts"]))
        self.ended = {**record, "status": status, "reason": reason}

    def revive(self) -> None:
        """A run marked dead (``process died``) while its store was away is RUNNING again."""
        up = self.upstream
        try:
            run = up.client.get_run(up.run_id)
        except Exception as e:
            if is_transient(e):
                raise _Transient(e) from e
            log.warning("could not check run %s: %s", up.run_id, short_reason(e))
            return
        if run.info.status == "FAILED" and run.data.tags.get(tr.FAILURE_TAG, "").startswith(
            PROCESS_DIED
        ):
            up.client.update_run(up.run_id, status="RUNNING")
            _delete_tags(up.client, up.run_id, tr.FAILURE_TAG, NOTE_TAG)
            log.warning(
                "run %s had been marked FAILED (%s) while the store was away: RUNNING again",
                up.run_id,
                PROCESS_DIED,
            )


def sync_command(job_dir: str | os.PathLike) -> str:
    return f"python -m {SYNC_MODULE} {shlex.quote(str(job_dir))}"


# --------------------------------------------------------------------------- the tracker


class SpoolTracker:
    """:class:`~sparsify_exp.runner.tracking.RunTracker`'s interface, through a spool.

    Every call writes its record to the spool and returns; a flusher thread uploads the
    records through ``upstream`` (the run's :class:`RunTracker`: its client, its log_batch)
    and refreshes the run's heartbeat. :meth:`finish` and :meth:`fail` queue the run's end
    and wait for the upload (``flush_timeout_s`` without progress at most).
    """

    def __init__(
        self,
        upstream: tr.RunTracker,
        spool_root: str | os.PathLike,
        *,
        uri: str,
        experiment_id: str | None = None,
        flush_timeout_s: float = 60.0,
        heartbeat_s: float = 30.0,
        poll_s: float = 1.0,
    ):
        self.upstream = upstream
        self.run_id = upstream.run_id
        self.uri = uri
        self.flush_timeout_s = float(flush_timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self.poll_s = float(poll_s)
        self.job_dir = Path(spool_root).parent
        self.spool = Spool.create(
            spool_root,
            self.run_id,
            tracking_uri=uri,
            experiment_id=experiment_id,
            job_dir=str(self.job_dir),
        )
        self.spool.lock()
        self._uploader = Uploader(self.spool, upstream)
        self._uploader.maybe_reaped = False  # until an outage or a stall
        self._lock = threading.Lock()
        self._seq = 0
        self._artifacts = 0
        self._ending = False
        self._rejections_seen = 0
        self._wake = threading.Event()
        self._done = threading.Event()
        self._stop = threading.Event()
        self._crash: BaseException | None = None
        self._down_since: float | None = None
        self._warned = False
        self._thread = threading.Thread(
            target=self._loop, name=f"spool-{self.run_id[:8]}", daemon=True
        )
        self._thread.start()

    # ---- RunTracker's interface

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not metrics:
            return
        values = {str(k): float(v) for k, v in metrics.items()}
        self._append({"kind": "metrics", "step": int(step), "values": values}, check=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if params:
            values = {str(k): str(v) for k, v in params.items()}
            self._append({"kind": "params", "values": values}, check=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags:
            values = {str(k): str(v) for k, v in tags.items()}
            self._append({"kind": "tags", "values": values}, check=True)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            return
        with self._lock:
            self._artifacts += 1
            name = f"a{self._artifacts:05d}"
        rel = self.spool.snapshot(path, name)
        self._append({"kind": "artifact", "path": rel, "artifact_path": artifact_path})

    def flush(self) -> None:
        """Makes what was logged durable and nudges the flusher; does not wait for the store."""
        self.spool.fsync()
        self._wake.set()

    def finish(self) -> None:
        """Ends the run FINISHED once everything before is uploaded (raises
        :class:`StoreRejected` when the store refused records: the run is then FAILED)."""
        self._end("FINISHED", None)
        if self._uploader.rejected:
            raise StoreRejected(
                f"the tracking store refused {len(self._uploader.rejected)} record(s) of run "
                f"{self.run_id} (first: {self._uploader.rejected[0]}); they are kept in "
                f"{self.spool.path / REJECTED_FILE}"
            )

    def fail(self, error: BaseException, status: str = "FAILED") -> None:
        """Ends the run ``status`` with the reason, once everything before is uploaded."""
        self._end(status, tr.failure_reason(error))

    # ---- internals

    def _raise_rejected(self) -> None:
        """A record the store refused fails the job at its next call, as a direct call
        would have (the run is then FAILED with the reason)."""
        rejected = self._uploader.rejected
        if len(rejected) > self._rejections_seen and not self._ending:
            self._rejections_seen = len(rejected)
            raise StoreRejected(f"the tracking store refused a record: {rejected[-1]}")

    def _append(self, record: dict[str, Any], check: bool = False) -> None:
        if check:
            self._raise_rejected()
        with self._lock:
            if self._ending:
                raise RuntimeError(f"run {self.run_id} was ended; nothing more can be logged")
            self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        """One line, written through to the OS: it survives the process (the flusher fsyncs)."""
        self._seq += 1
        line = json.dumps(
            {"seq": self._seq, "ts": int(time.time() * 1000), **record}, separators=(",", ":")
        )
        self.spool.append(line.encode() + b"\n")

    def _end(self, status: str, reason: str | None) -> None:
        with self._lock:
            if self._ending:
                return
            self._write({"kind": "end", "status": status, "reason": reason})
            self._ending = True
        self.spool.fsync()
        self._wake.set()
        started = time.monotonic()
        try:  # rare wake-ups: each one would take the GIL from the uploading thread
            while not self._done.is_set():
                idle = time.monotonic() - max(started, self._uploader.progress_at)
                if idle > self.flush_timeout_s:
                    break
                self._done.wait(min(1.0, self.flush_timeout_s - idle + 0.01))
        except BaseException:  # Ctrl-C, a signal: stop waiting, the spool stays
            self._give_up("not waited for (interrupted)")
            raise
        if not self._done.is_set() or self._crash is not None or not self._uploader.ended:
            if self._crash is not None:
                why = f"upload failed ({type(self._crash).__name__}: {self._crash})"
            elif self._down_since is not None:
                why = f"still unreachable after {self.flush_timeout_s:g} s"
            else:
                why = f"upload made no progress for {self.flush_timeout_s:g} s"
            self._give_up(why)
            return
        self._thread.join(timeout=5)
        if self._uploader.rejected:
            self.spool.close()  # kept: rejected.jsonl says what the store refused
            self.spool.unlock()
        else:
            self.spool.remove()

    def _give_up(self, why: str) -> None:
        """Stops the flusher and leaves the spool, with the command that uploads it later.
        The flusher lets go of the spool's lock once its request in flight (if any) ended."""
        self._stop.set()
        self._wake.set()
        with contextlib.suppress(OSError):
            self.spool.close()
        self._thread.join(timeout=1.0)
        log.warning(
            "tracking store %s %s: %d record(s) of run %s are kept in %s; upload them "
            "later with: %s",
            self.uri,
            why,
            self.spool.pending(),
            self.run_id,
            self.spool.path,
            sync_command(self.job_dir),
        )

    def _loop(self) -> None:
        try:
            self._rounds()
        finally:
            if self._stop.is_set():  # given up: `sync` may take over now
                self.spool.unlock()

    def _rounds(self) -> None:
        up = self._uploader
        backoff = 0.0
        next_beat = time.monotonic() + self.heartbeat_s
        while not self._stop.is_set():
            beat_in = self.poll_s if self._ending else next_beat - time.monotonic()
            wait = backoff or min(self.poll_s, max(0.01, beat_in))
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self._down_since is not None and not self._ending:
                    self._uploader.revive()  # before new records: it may have been reaped
                while up.behind() and not self._stop.is_set():
                    self.spool.fsync()
                    if not up.step(self._stop):
                        break
                    next_beat = self._beat(next_beat)
                next_beat = self._beat(next_beat)
                if self._down_since is not None:
                    self._back()
                if up.ended is not None:
                    self._done.set()
                    return
            except _Transient as e:
                self._away(e)
                backoff = min(max(backoff * 2, 0.5), MAX_BACKOFF_S)
                continue
            except Exception as e:  # a bug, or a full disk: keep the spool, say why
                if self._stop.is_set():  # given up meanwhile (the spool was closed)
                    return
                log.exception("spool uploader of run %s stopped", self.run_id)
                self._crash = e
                self._done.set()
                return
            backoff = 0.0

    def _beat(self, next_beat: float) -> float:
        """Refreshes the heartbeat tag when it is due (not once the run is ending)."""
        now = time.monotonic()
        if self._ending or now < next_beat:
            return next_beat
        if now - next_beat > self.heartbeat_s:  # stalled (a long request): check at the end
            self._uploader.maybe_reaped = True
        try:
            self.upstream.client.set_tag(self.run_id, HEARTBEAT_TAG, str(int(time.time())))
        except Exception as e:
            if is_transient(e):
                raise _Transient(e) from e
            log.warning("heartbeat of run %s failed: %s", self.run_id, short_reason(e))
        return now + self.heartbeat_s

    def _away(self, error: _Transient) -> None:
        self._uploader.maybe_reaped = True
        if self._down_since is None:
            self._down_since = time.monotonic()
        if not self._warned:
            self._warned = True
            log.warning(
                "tracking store %s unreachable (%s): the run goes on, logging to %s, and "
                "uploads when the store is back",
                self.uri,
                error,
                self.spool.path,
            )

    def _back(self) -> None:
        log.info(
            "tracking store %s reachable again after %.0f s: spooled records uploaded",
            self.uri,
            time.monotonic() - (self._down_since or time.monotonic()),
        )
        self._down_since = None
