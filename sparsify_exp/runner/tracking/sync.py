"""``python -m sparsify_exp.sync <job dir>``: uploads what a job left in its spool.

A job whose tracking store was still away when it ended keeps its records in
``<job dir>/spool/<run id>/`` (:mod:`sparsify_exp.runner.tracking.spool`). This uploads them, in
order, from the last acknowledged record: running it twice, or after an uploader that died
mid-batch, adds nothing twice. A sweep folder uploads the spools of all its jobs. A spool
without its end record (the job's process died) ends its run FAILED ("process died").
Exit status: 0 when everything was uploaded (or nothing was left), 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from sparsify_exp.runner.tracking import heartbeat, reachability
from sparsify_exp.runner.tracking import spool as sp
from sparsify_exp.runner.tracking import store as tr
from sparsify_exp.runner.tracking.uploader import RunEndedElsewhere, Uploader

__all__ = ["main", "sync"]


def sync(
    path: str | Path,
    tracking_uri: str | None = None,
    timeout_s: float = 10.0,
    out=print,
    clean: bool = False,
) -> int:
    """Uploads every spool under ``path``; returns the exit status (0: all uploaded).
    ``clean``: also delete the partial files a killed job left in its folder (when no
    process holds that folder)."""
    if clean:
        _remove_leftovers(Path(path), out)
    spools = sp.Spool.find(path)
    if not spools:
        out(f"nothing to upload: no spool under {path}")
        return 0
    status = 0
    for spool in spools:
        status = max(status, _sync_one(spool, tracking_uri, timeout_s, out))
    return status


def _sync_one(spool: sp.Spool, uri: str | None, timeout_s: float, out) -> int:

    if not spool.lock():
        out(f"{spool.path}: a running job is uploading it; try again when it has ended")
        return 1
    try:
        info = spool.info()
        uri = uri or info["tracking_uri"]
        run_id = info["run_id"]
        reachability.configure_http(uri)
        reachability.quiet_store_loggers()
        upstream = tr.RunTracker(tr.open_client(uri), run_id)
        uploader = Uploader(spool, upstream)
        deadline = time.monotonic() + timeout_s
        backoff = 0.5
        while True:
            try:
                reachability.check_reachable(uri)
                while uploader.step():
                    pass
                died = None if uploader.ended else _end_dead_run(uploader)
                break
            except (reachability.Transient, reachability.StoreUnreachable) as e:
                if time.monotonic() >= deadline:
                    reason = e.reason if isinstance(e, reachability.StoreUnreachable) else str(e)
                    out(
                        f"tracking store {uri} unreachable: {reason}; {spool.pending()} "
                        f"record(s) of run {run_id} left in {spool.path}"
                    )
                    spool.unlock()
                    return 1
                time.sleep(backoff)
                backoff = min(backoff * 2, reachability.MAX_BACKOFF_S)
    except RunEndedElsewhere as e:  # its end would flip the run back: not uploaded
        out(f"{spool.path}: not uploaded: {e}")
        spool.remove()
        return 0
    except BaseException:
        spool.unlock()
        raise
    line = f"run {run_id}: {uploader.applied} record(s) uploaded to {uri}"
    if uploader.ended and uploader.ended.get("status"):
        line += f", run {uploader.ended['status']}"
    if died:
        line += f", run FAILED ({died})"
    if uploader.rejected:
        out(
            f"{line}; the store refused {len(uploader.rejected)} record(s) (first: "
            f"{uploader.rejected[0]}), kept in {spool.path / sp.REJECTED_FILE}"
        )
        spool.unlock()
        return 1
    out(line)
    spool.remove()
    return 0


def _remove_leftovers(path: Path, out) -> None:
    from sparsify_exp.atomic import remove_leftovers
    from sparsify_exp.runner.context import JOB_LOCK, job_folder_busy

    jobs = [path] if (path / JOB_LOCK).exists() else [p.parent for p in path.glob(f"**/{JOB_LOCK}")]
    for job_dir in jobs:
        if job_folder_busy(job_dir) is None:
            for leftover in remove_leftovers(job_dir):
                out(f"removed {leftover} (a partial file of a stopped job)")


def _end_dead_run(uploader: Uploader) -> str | None:
    """The job died before ending its run: FAILED, unless something already ended it."""
    client, run_id = uploader.upstream.client, uploader.run_id
    try:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            return None
        last = uploader.last_record or {}
        ts = last.get("ts") or int(time.time() * 1000)
        reason = f"{heartbeat.PROCESS_DIED} (last spooled record {sp.iso_time(ts / 1000)})"
        uploader.upstream.set_tags(heartbeat.failure_tags("FAILED", reason))
        client.set_terminated(run_id, "FAILED", end_time=int(ts))
    except Exception as e:
        if reachability.is_transient(e):
            raise reachability.Transient(e) from e
        raise
    return reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsify_exp.sync",
        description="Upload the records a job left in <job dir>/spool to the MLflow store "
        "(a sweep folder: every job's). Idempotent: nothing is uploaded twice.",
    )
    parser.add_argument("path", help="a job folder, a sweep folder, or one spool folder")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="upload to this store instead of the one the job used (run.json)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to keep trying while the store is unreachable (default 10)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not Path(args.path).exists():
        print(f"no such folder: {args.path}", file=sys.stderr)
        return 2
    return sync(args.path, args.tracking_uri, args.timeout, clean=True)
