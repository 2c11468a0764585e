"""The tracker a job logs through: every call is written to the run's spool and returns; a
flusher thread uploads it (:mod:`.uploader`) and refreshes the run's heartbeat
(:mod:`.heartbeat`). The store may be away for as long as it likes; nothing is lost."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sparsify_exp.runner.tracking import store as tr
from sparsify_exp.runner.tracking.heartbeat import HEARTBEAT_TAG, failure_tags
from sparsify_exp.runner.tracking.reachability import (
    MAX_BACKOFF_S,
    Transient,
    is_transient,
    short_reason,
)
from sparsify_exp.runner.tracking.spool import Spool
from sparsify_exp.runner.tracking.uploader import RunEndedElsewhere, Uploader, sync_command

log = logging.getLogger("sparsify_exp.runner")

#: How often an idle flusher checks that no other process ended the run (seconds); it also
#: checks before each upload round.
CHECK_ENDED_S = 1.0


# --------------------------------------------------------------------------- the tracker


class SpoolTracker:
    """:class:`~sparsify_exp.runner.tracking.store.RunTracker`'s interface, through a spool.

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
        self._wake = threading.Event()
        self._done = threading.Event()
        self._stop = threading.Event()
        self._crash: BaseException | None = None
        self._down_since: float | None = None
        self._warned = False
        self._ended_elsewhere: RunEndedElsewhere | None = None
        self._checked_at = 0.0
        self._thread = threading.Thread(
            target=self._loop, name=f"spool-{self.run_id[:8]}", daemon=True
        )
        self._thread.start()

    # ---- RunTracker's interface

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not metrics:
            return
        values = {str(k): float(v) for k, v in metrics.items()}
        self._append({"kind": "metrics", "step": int(step), "values": values})

    def log_params(self, params: Mapping[str, Any]) -> None:
        if params:
            values = {str(k): str(v) for k, v in params.items()}
            self._append({"kind": "params", "values": values})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags:
            values = {str(k): str(v) for k, v in tags.items()}
            self._append({"kind": "tags", "values": values})

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
        """Ends the run FINISHED once everything before is uploaded. Records the store
        refused (a key it does not take) were said once and are kept in the spool's
        ``rejected.jsonl``; they do not make a finished run FAILED (its tag
        ``sparsify.rejected`` counts them)."""
        self._end("FINISHED", None)

    def fail(self, error: BaseException, status: str = "FAILED") -> None:
        """Ends the run ``status`` with the reason, once everything before is uploaded."""
        self._end(status, tr.failure_reason(error))

    # ---- internals

    def _append(self, record: dict[str, Any]) -> None:
        if self._ended_elsewhere is not None and not self._ending:
            raise self._ended_elsewhere  # the job stops: its run is over
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
            self._ending = True
            if self._ended_elsewhere is not None:  # not flipped back, not logged into
                self._drop(self._ended_elsewhere)
                return
            try:
                self._write({"kind": "end", "status": status, "reason": reason})
            except OSError as e:  # the spool cannot take it (a full disk): end it directly
                self._end_directly(status, reason, e)
                return
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
        if self._ended_elsewhere is not None:
            self._drop(self._ended_elsewhere)
            return
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

    def _drop(self, ended: RunEndedElsewhere) -> None:
        """The run was ended by another process: what this job spooled since is dropped, so
        that neither this job nor a later ``sync`` logs into it or changes its status."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        pending = self.spool.pending()
        self.spool.remove()
        log.warning(
            "run %s was ended %s by another process (%s): %d record(s) this job logged "
            "since were dropped",
            self.run_id,
            ended.status,
            ended.reason,
            pending,
        )

    def _end_directly(self, status: str, reason: str | None, error: OSError) -> None:
        """Ends the run in the store itself when its end cannot be spooled: a full job
        folder must not leave it RUNNING. The records spooled before stay for ``sync``."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=max(self.poll_s, 1.0) * 5)
        with contextlib.suppress(OSError):
            self.spool.close()
        why = f"{type(error).__name__}: {error}"
        if status == "FINISHED":
            status, reason = "FAILED", why
        else:
            reason = f"{reason} (then {why})" if reason and why not in reason else reason or why
        try:
            self.upstream.set_tags(failure_tags(status, reason))
            self.upstream.client.set_terminated(self.run_id, status)
        except Exception as e:
            log.error("could not end run %s in the store: %s", self.run_id, short_reason(e))
            return
        finally:
            self.spool.unlock()
        log.error(
            "run %s ended %s directly (its spool could not take it: %s); %d spooled record(s) "
            "not uploaded yet: %s",
            self.run_id,
            status,
            error,
            self.spool.pending(),
            sync_command(self.job_dir),
        )

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
                now = time.monotonic()
                if not self._ending and (up.behind() or now - self._checked_at >= CHECK_ENDED_S):
                    self._checked_at = now  # before each upload: nothing goes into an ended run
                    up.check_ended()
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
            except RunEndedElsewhere as e:
                self._ended_elsewhere = e
                self._done.set()
                return
            except Transient as e:
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
                raise Transient(e) from e
            log.warning("heartbeat of run %s failed: %s", self.run_id, short_reason(e))
        return now + self.heartbeat_s

    def _away(self, error: Transient) -> None:
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
