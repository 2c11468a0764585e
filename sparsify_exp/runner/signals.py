"""Signals end runs honestly: SIGTERM (what Slurm, Kubernetes and ``docker stop`` send) raises
:class:`Terminated` in the main thread, as SIGINT raises ``KeyboardInterrupt``, so a run is
marked KILLED with the signal as the reason and uploads what it has before the process exits
with the conventional code (128 + the signal's number)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class Terminated(BaseException):
    """The process received ``signum`` (a BaseException: ``except Exception`` lets it pass)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; elsewhere a
    no-op, since only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def is_stop(error: BaseException) -> bool:
    """A signal or Ctrl-C, not a failure: the run is KILLED rather than FAILED."""
    return isinstance(error, (Terminated, KeyboardInterrupt))


def stop_reason(error: BaseException) -> str:
    if isinstance(error, Terminated):
        return f"{signal.Signals(error.signum).name}: {error}"
    return "SIGINT: interrupted (Ctrl-C)"


def exit_code(error: BaseException) -> int:
    """128 + the signal's number: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + (error.signum if isinstance(error, Terminated) else signal.SIGINT)
