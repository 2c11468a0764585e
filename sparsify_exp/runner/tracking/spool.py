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
import shutil
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("sparsify_exp.runner")

SPOOL_DIR = "spool"

RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
ACK_FILE = "acked"
REJECTED_FILE = "rejected.jsonl"
LOCK_FILE = "lock"
ARTIFACTS_DIR = "artifacts"

#: Bytes of records read from the spool at a time.
READ_CHUNK = 4 << 20
#: Files at least this big are snapshot as hard links (when the file system allows).
LINK_FROM_BYTES = 1 << 20


def iso_time(unix_s: float) -> str:
    """``2026-11-25T17:48:10+01:00``: local time with its offset."""
    return datetime.fromtimestamp(unix_s).astimezone().isoformat(timespec="seconds")


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
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:  # a full disk: say which file
            if e.filename or e.errno is None:
                raise
            raise OSError(e.errno, e.strerror, str(self.records)) from e

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
