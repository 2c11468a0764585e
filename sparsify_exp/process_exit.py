"""How ``python -m sparsify_exp`` ends its process: quickly after a single run, normally after
a sweep."""

from __future__ import annotations

import contextlib
import os
import sys

_NORMAL_EXIT_REQUIRED = False


def require_normal_exit() -> None:
    """Makes :func:`fast_exit` exit normally: a sweep's launcher workers are shut down by the
    threading machinery that the interpreter's teardown runs."""
    global _NORMAL_EXIT_REQUIRED
    _NORMAL_EXIT_REQUIRED = True


def fast_exit(code: object = 0) -> None:
    """Exits like ``sys.exit(code)`` after the atexit handlers, skipping the interpreter's
    module teardown (about 1.3 s here once torch and MLflow are loaded: it frees nothing a
    finished process needs). Used by ``python -m sparsify_exp`` for single runs; a sweep exits
    normally (launcher workers are shut down by the threading machinery that teardown runs).
    Set ``SPARSIFY_EXP_NO_FAST_EXIT=1`` to always exit normally."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")
        status = 1
    if os.environ.get("SPARSIFY_EXP_NO_FAST_EXIT") or _NORMAL_EXIT_REQUIRED:
        raise SystemExit(status)
    import atexit

    atexit._run_exitfuncs()  # logging.shutdown (flushes the job log), MLflow's own hooks
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
