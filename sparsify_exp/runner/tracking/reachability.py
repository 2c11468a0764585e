"""Is the tracking store there? Reachability checks before a run starts, the errors that say
why not, and which upload failures are worth retrying (connection, timeout, 5xx, a locked
sqlite file) versus refused for good (4xx)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator

log = logging.getLogger("sparsify_exp.runner")

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


class Transient(Exception):
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


# --------------------------------------------------------------------------- quiet clients

#: Loggers that report each failed call to an away or refusing store themselves: MLflow's
#: SQL store logs a traceback per failed session, urllib3 a "Retrying ..." line per request.
#: The runner says once that the store is away and once that it is back.
NOISY_LOGGERS = (
    "mlflow.store.db.utils",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.utils.rest_utils",
    "mlflow.tracking._tracking_service.client",
    "urllib3.connectionpool",
    "urllib3.util.retry",
)


class _Quiet(logging.Filter):
    """Drops warnings and errors (and their tracebacks) of a store client's logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


_QUIET = _Quiet()


def quiet_store_loggers() -> None:
    """Silences :data:`NOISY_LOGGERS`' warnings and errors for this process (idempotent);
    ``SPARSIFY_EXP_STORE_LOGS=1`` keeps them, for debugging a store."""
    if os.environ.get("SPARSIFY_EXP_STORE_LOGS"):
        return
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)


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
