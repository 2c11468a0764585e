"""Runs whose process died: while a run is RUNNING its tracker refreshes the tag
``sparsify.heartbeat`` (unix seconds); :func:`reap_dead_runs` marks RUNNING runs with a stale
heartbeat FAILED ("process died")."""

from __future__ import annotations

import logging
import time
from typing import Any

from sparsify_exp.runner.tracking import store as tr
from sparsify_exp.runner.tracking.spool import iso_time

log = logging.getLogger("sparsify_exp.runner")

HEARTBEAT_TAG = "sparsify.heartbeat"
NOTE_TAG = "mlflow.note.content"
PROCESS_DIED = "process died"


def delete_tags(client: Any, run_id: str, *keys: str) -> None:
    """Deletes tags; one already gone is no error (a retried round may delete it twice)."""
    from mlflow.exceptions import MlflowException

    for key in keys:
        try:
            client.delete_tag(run_id, key)
        except MlflowException as e:
            if e.get_http_status_code() != 404:
                raise


def failure_tags(status: str, reason: str) -> dict[str, str]:
    return {tr.FAILURE_TAG: reason, NOTE_TAG: f"**{status}**\n\n```\n{reason}\n```"}


def reap_dead_runs(
    client: Any, experiment_id: str, stale_s: float, now: float | None = None
) -> list[str]:
    """Marks FAILED the RUNNING runs of ``experiment_id`` whose ``sparsify.heartbeat`` tag is
    older than ``stale_s`` seconds (their process died without ending them); returns their ids.

    Runs without the tag (runs of other tools) are left alone; a sweep's parent run has it
    (:class:`Beater`).
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
            tags = [RunTag(k, v) for k, v in failure_tags("FAILED", reason).items()]
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


class Beater:
    """Refreshes a run's ``sparsify.heartbeat`` tag every ``every_s`` seconds from a daemon
    thread, for runs that have no spool flusher to do it (a sweep's parent): if the process
    dies, the next start marks the run FAILED like any other."""

    def __init__(self, client: Any, run_id: str, every_s: float):
        import threading

        self.client, self.run_id, self.every_s = client, run_id, float(every_s)
        self._stop = threading.Event()
        self._warned = False
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-{run_id[:8]}", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.client.set_tag(self.run_id, HEARTBEAT_TAG, str(int(time.time())))
                run = self.client.get_run(self.run_id)  # taken for dead while the store
                reason = run.data.tags.get(tr.FAILURE_TAG, "")  # was away? it was not
                if run.info.status == "FAILED" and reason.startswith(PROCESS_DIED):
                    self.client.update_run(self.run_id, status="RUNNING")
                    delete_tags(self.client, self.run_id, tr.FAILURE_TAG, NOTE_TAG)
            except Exception as e:  # the store may be away or busy: the next beat retries
                if not self._warned:
                    self._warned = True
                    log.warning("heartbeat of run %s failed (retrying): %s", self.run_id, e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
