"""``python -m sparsify_exp [group=option ...] [key=value ...]`` (``-m`` for a sweep)."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys


def exit_without_teardown(code: object) -> None:
    """Exits like ``sys.exit(code)`` after the atexit handlers (the job log's flush, MLflow's
    own hooks), skipping the interpreter's module teardown: about 1.5 s once torch and MLflow
    are loaded, freeing nothing a finished process needs (``scripts/bench_runner.py``). Only
    after a single run: a sweep's launcher workers are shut down by the threading machinery
    that teardown runs. ``SPARSIFY_EXP_NO_FAST_EXIT=1`` always exits normally."""
    status = 0 if code is None else code if isinstance(code, int) else 1
    if not isinstance(code, (int, type(None))):
        sys.stderr.write(f"{code}\n")
    if os.environ.get("SPARSIFY_EXP_NO_FAST_EXIT"):
        raise SystemExit(status)
    atexit._run_exitfuncs()  # the one private call: what sys.exit runs before teardown
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _is_sweep(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") or a.startswith("hydra.mode=MULTIRUN") for a in argv)


if __name__ == "__main__":
    from sparsify_exp.runner.cli import main

    if _is_sweep(sys.argv[1:]):
        main()
    else:
        try:
            main()
        except SystemExit as e:
            exit_without_teardown(e.code)
        exit_without_teardown(0)
