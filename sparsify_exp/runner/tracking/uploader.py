"""Uploads a spool's records to the MLflow store, in order, acknowledging each call that
returned: used by the run's own flusher thread and by ``python -m sparsify_exp.sync``."""

from __future__ import annotations

import logging
import os
import shlex
import threading
import time
from collections.abc import Mapping
from typing import Any

from sparsify_exp.runner.tracking import store as tr
from sparsify_exp.runner.tracking.heartbeat import (
    HEARTBEAT_TAG,
    NOTE_TAG,
    PROCESS_DIED,
    delete_tags,
    failure_tags,
)
from sparsify_exp.runner.tracking.reachability import Transient, is_transient, short_reason
from sparsify_exp.runner.tracking.spool import REJECTED_FILE, Spool

log = logging.getLogger("sparsify_exp.runner")

#: Metrics sent in one ``log_batch`` call (the client splits it into requests of 1000).
METRICS_PER_CALL = 5000
SYNC_MODULE = "sparsify_exp.sync"
#: On a run whose store refused records (kept in the spool's ``rejected.jsonl``).
REJECTED_TAG = "sparsify.rejected"


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


class RunEndedElsewhere(BaseException):
    """The job's run was ended by another process (its sweep was stopped, a user killed it):
    the job stops and logs nothing more into it (a BaseException, like a signal)."""

    def __init__(self, run_id: str, status: str, reason: str):
        self.run_id, self.status, self.reason = run_id, status, reason
        super().__init__(f"run {run_id} was ended {status} by another process ({reason})")


def ended_elsewhere(run: Any) -> tuple[str, str] | None:
    """``(status, reason)`` when ``run`` was ended while its job still runs; None while it is
    RUNNING or was only taken for dead (``process died``: the job revives it)."""
    status = run.info.status
    reason = run.data.tags.get(tr.FAILURE_TAG, "")
    if status == "RUNNING" or (status == "FAILED" and reason.startswith(PROCESS_DIED)):
        return None
    return status, reason or "no reason given"


def _split(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A metrics/params/tags record as one record a value (to find the one the store refuses)."""
    values = record.get("values") or {}
    if record.get("kind") not in ("metrics", "params", "tags") or len(values) < 2:
        return [record]
    return [{**record, "values": {k: v}} for k, v in values.items()]


class Uploader:
    """Sends a spool's records after the acknowledged offset to the store, in order, and
    acknowledges each call that returned.

    :meth:`step` raises :class:`Transient` when the store is away (what was acknowledged
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
                raise Transient(e) from e
            if len(group) == 1 and len(_split(group[0])) == 1:
                self._reject(group[0], e)
                return
        for record in group:  # find what the store refuses; the rest goes on
            for part in _split(record):
                try:
                    self._apply([part])
                except Exception as e:
                    if is_transient(e):
                        raise Transient(e) from e
                    self._reject(part, e)

    def _reject(self, record: dict[str, Any], error: BaseException) -> None:
        reason = f"{type(error).__name__}: {short_reason(error)}"
        self.spool.reject(record, reason)
        self.rejected.append(reason)
        if record.get("kind") == "end":
            self.ended = {**record, "rejected": reason}
        if len(self.rejected) == 1:  # once: a family of bad keys would repeat it every step
            log.warning(
                "the tracking store refused a %s record of run %s (%s); the run goes on, "
                "refused records are kept in %s",
                record.get("kind"),
                self.run_id,
                reason,
                self.spool.path / REJECTED_FILE,
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

    def check_ended(self) -> None:
        """Raises :class:`RunEndedElsewhere` when another process ended the run (a stopped
        sweep marks its running children KILLED): nothing more is uploaded into it."""
        up = self.upstream
        try:
            run = up.client.get_run(up.run_id)
        except Exception as e:
            if is_transient(e):
                raise Transient(e) from e
            raise
        ended = ended_elsewhere(run)
        if ended is not None:
            raise RunEndedElsewhere(up.run_id, *ended)

    def _apply_end(self, record: dict[str, Any]) -> None:
        up = self.upstream
        status, reason = str(record["status"]), record.get("reason")
        try:
            self.check_ended()  # never flips back a run another process ended
        except RunEndedElsewhere as e:
            if e.status != status:
                raise
            self.ended = {**record, "status": status, "reason": reason}  # applied before
            return
        if self.rejected:  # said once when it happened; on the run for whoever looks
            up.set_tags(
                {
                    REJECTED_TAG: f"{len(self.rejected)} record(s) refused by the store "
                    f"(first: {self.rejected[0]})"[:5000]
                }
            )
        if self.maybe_reaped and not reason:  # marked dead while away? it was not
            stale = up.client.get_run(up.run_id).data.tags.get(tr.FAILURE_TAG, "")
            if stale.startswith(PROCESS_DIED):
                delete_tags(up.client, up.run_id, tr.FAILURE_TAG, NOTE_TAG)
        if reason:
            up.set_tags(failure_tags(status, str(reason)))
        up.client.set_terminated(up.run_id, status, end_time=int(record["ts"]))
        # an ended run has no heartbeat to show (after the end: a run left RUNNING keeps it)
        delete_tags(up.client, up.run_id, HEARTBEAT_TAG)
        self.ended = {**record, "status": status, "reason": reason}

    def revive(self) -> None:
        """A run marked dead (``process died``) while its store was away is RUNNING again."""
        up = self.upstream
        try:
            run = up.client.get_run(up.run_id)
        except Exception as e:
            if is_transient(e):
                raise Transient(e) from e
            log.warning("could not check run %s: %s", up.run_id, short_reason(e))
            return
        if run.info.status == "FAILED" and run.data.tags.get(tr.FAILURE_TAG, "").startswith(
            PROCESS_DIED
        ):
            up.client.update_run(up.run_id, status="RUNNING")
            delete_tags(up.client, up.run_id, tr.FAILURE_TAG, NOTE_TAG)
            log.warning(
                "run %s had been marked FAILED (%s) while the store was away: RUNNING again",
                up.run_id,
                PROCESS_DIED,
            )


def sync_command(job_dir: str | os.PathLike) -> str:
    return f"python -m {SYNC_MODULE} {shlex.quote(str(job_dir))}"
