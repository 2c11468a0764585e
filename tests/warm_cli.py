"""``python -m sparsify_exp ...`` for the tests, forked from a warm interpreter.

A cold ``python -m sparsify_exp`` spends about 3.3 CPU-s importing torch, MLflow and Hydra
before it reads its first argument. The suite starts some seventy of them, and on a 2-core
machine those imports were nearly half of ``make test``'s CPU time (``scripts/time_tests.sh``).
So the test session keeps one server process that has imported the runner once, and every
CLI run a test asks for is a fresh ``fork()`` of it that then becomes the requested process:
its own pid, session (when asked), working directory, environment, argv, ``sys.path[0]`` (the
working directory, as ``-m`` sets it) and stdio pipes, running the module as ``__main__`` and
exiting through the interpreter's own exit path, so exit codes, signals, kill -9, atexit hooks
and the runner's own subprocesses behave as in a cold start.

What a fork cannot give, a cold start does: a run whose environment changes what the
interpreter or torch reads at start-up (``PYTHON*``, ``OMP_*``, ``MKL_*``, ``LD_*`` and the
like) starts cold, and ``SPARSIFY_EXP_TEST_COLD_START=1`` starts every run cold, to check that
the suite passes the same way (it does; ``make test`` then takes longer). The forked runs share
the server's hash seed, so set and dict orders of strings are alike across them.

Protocol (one ``SOCK_SEQPACKET`` connection per run): the test sends the request as JSON with
the write ends of its stdout and stderr pipes; the CLI process sends ``{"pid": ...}`` once it
is set up; a waiter process (the CLI's parent) sends ``{"returncode": ...}`` when it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import locale
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

#: Environment variables read when the interpreter, OpenMP or torch's import starts: a run that
#: sets them differently from the server's environment starts cold. (Not ``PYTORCH_*`` or
#: ``TORCHINDUCTOR_*``: libraries set those in the test process itself, and torch reads them
#: later, if at all.)
STARTUP_PREFIXES = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "LD_", "TORCH_")
COLD_START_FLAG = "SPARSIFY_EXP_TEST_COLD_START"
#: What the server imports once: the runner, and what many runs import on first use (MLflow's
#: SQL store, matplotlib for mask images, plotly for a sweep's charts, the ``torch._dynamo``
#: that torch's optimizers import, scikit-learn's datasets for the digits examples): about
#: 3 CPU-s a run would repeat.
PRELOAD = (
    "sparsify_exp.runner.cli",
    "mlflow.store.tracking.sqlalchemy_store",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "plotly.subplots",
    "torch._dynamo",
    "sklearn.datasets",
    "sklearn.model_selection",
)
#: Start-up variables a preloaded library sets in ``os.environ`` when imported (scikit-learn's
#: ``KMP_*``, for Intel's OpenMP). Every test process sets them first, to the library's values:
#: otherwise a worker that has imported the library would differ from the server's recorded
#: environment, and its runs would start cold. The server refuses to start if an import sets
#: anything else.
SET_BY_IMPORTS = {"KMP_DUPLICATE_LIB_OK": "True", "KMP_INIT_AT_FORK": "FALSE"}
for _name, _value in SET_BY_IMPORTS.items():
    os.environ.setdefault(_name, _value)
_MAX_REQUEST = 1 << 20


# --------------------------------------------------------------------------- test side


class WarmProcess:
    """The part of :class:`subprocess.Popen` the tests use, for a forked CLI process."""

    def __init__(self, conn: socket.socket, stdout: int, stderr: int, args: list[str]) -> None:
        self.args = args
        self.returncode: int | None = None
        self._conn = conn
        self._fds = {"stdout": stdout, "stderr": stderr}
        self._out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        first = self._receive(timeout=60)
        if "pid" not in first:
            raise RuntimeError(f"the warm CLI server did not start the run: {first}")
        self.pid: int = first["pid"]

    def _receive(self, timeout: float | None) -> dict:
        self._conn.settimeout(timeout)
        try:
            msg = self._conn.recv(_MAX_REQUEST)
        finally:
            self._conn.settimeout(None)
        if not msg:
            raise RuntimeError("the warm CLI server closed the connection")
        return json.loads(msg)

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(TimeoutError, BlockingIOError):
                self.returncode = self._receive(timeout=0)["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = self._receive(timeout)["returncode"]
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input: None = None, timeout: float | None = None) -> tuple[str, str]:
        """Reads both pipes to their end, then waits; on timeout the output so far is kept
        for the next call, as ``Popen.communicate`` keeps it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for name, fd in self._fds.items():
                if fd >= 0:
                    sel.register(fd, selectors.EVENT_READ, name)
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 1 << 16)
                    if chunk:
                        self._out[key.data] += chunk
                    else:
                        sel.unregister(key.fd)
                        os.close(key.fd)
                        self._fds[key.data] = -1
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
        self._conn.close()
        return _text(self._out["stdout"]), _text(self._out["stderr"])

    def __enter__(self) -> WarmProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.communicate()


def _text(data: bytes) -> str:
    """Bytes as ``Popen(text=True)`` gives them: locale encoding, universal newlines."""
    return io.TextIOWrapper(io.BytesIO(bytes(data)), locale.getpreferredencoding(False)).read()


class WarmServer:
    """The warm interpreter of this test session, started on first use. Under xdist the workers
    share one (the first to need it starts it, under a file lock): it lives until the session's
    controller process ends. Without xdist it lives as long as this process."""

    def __init__(self) -> None:
        run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
        owner = os.getppid() if run else os.getpid()
        folder = Path(tempfile.gettempdir()) / f"warm_cli_{run or os.getpid()}"
        folder.mkdir(exist_ok=True)
        self.path = str(folder / "sock")
        with open(folder / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self._answers():
                self._start(folder, owner)
            self.env: dict[str, str] = json.loads((folder / "env.json").read_text())

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(self.path)
            except OSError:
                return False
        return True

    def _start(self, folder: Path, owner: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        proc = subprocess.Popen(
            [sys.executable, __file__, self.path, str(owner)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            cwd=folder,
            start_new_session=True,
        )
        ready = proc.stdout.readline()
        proc.stdout.close()
        if ready.strip() != b"ready":
            raise RuntimeError(f"the warm CLI server did not start (said {ready!r})")
        (folder / "env.json").write_text(json.dumps(dict(os.environ)))

    def fits(self, env: dict[str, str]) -> bool:
        """Whether a run with ``env`` may be forked: nothing read at start-up differs."""
        keys = {k for k in (*env, *self.env) if k.startswith(STARTUP_PREFIXES)}
        return all(env.get(k) == self.env.get(k) for k in keys)

    def start(
        self,
        module: str,
        args: Sequence[str],
        cwd: Path | str,
        env: dict[str, str],
        *,
        start_new_session: bool = False,
        blocked: Sequence[str] = (),
    ) -> WarmProcess:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(self.path)
        request = {
            "module": module,
            "args": list(args),
            "cwd": os.path.abspath(cwd),
            "env": env,
            "new_session": start_new_session,
            "blocked": list(blocked),
        }
        socket.send_fds(conn, [json.dumps(request).encode()], [out_w, err_w])
        os.close(out_w)
        os.close(err_w)
        return WarmProcess(conn, out_r, err_r, [sys.executable, "-m", module, *args])


_server: WarmServer | None = None
_server_lock = threading.Lock()


def _warm_server() -> WarmServer:
    global _server
    with _server_lock:
        if _server is None:
            _server = WarmServer()
        return _server


def start(
    module: str,
    args: Sequence[str],
    cwd: Path | str,
    env: dict[str, str] | None = None,
    *,
    start_new_session: bool = False,
    blocked: Sequence[str] = (),
) -> WarmProcess | subprocess.Popen:
    """``python -m module *args`` in ``cwd`` with ``env`` (default: this process's), stdout and
    stderr piped as text; forked warm unless the environment asks for a cold start.
    ``blocked`` modules cannot be imported in it (``sys.modules[name] = None``)."""
    env = dict(os.environ if env is None else env)
    if os.environ.get(COLD_START_FLAG) != "1":
        server = _warm_server()
        if server.fits(env):
            return server.start(
                module, args, cwd, env, start_new_session=start_new_session, blocked=blocked
            )
    argv = [sys.executable, "-m", module, *args]
    if blocked:  # as -m would run it, after the blocked modules are made unimportable
        code = "import runpy, sys; " + "".join(f"sys.modules[{m!r}] = None; " for m in blocked)
        code += f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
        argv = [sys.executable, "-c", code, *args]
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=start_new_session,
    )


def run(
    module: str,
    args: Sequence[str],
    cwd: Path | str,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    *,
    blocked: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """Like ``subprocess.run([python, -m, module, *args], capture_output=True, text=True)``."""
    proc = start(module, args, cwd, env, blocked=blocked)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --------------------------------------------------------------------------- server side


def _serve(path: str, owner: int) -> tuple[dict, list[int], socket.socket]:
    """Accepts runs until the ``owner`` process ends; returns only in a forked CLI process, with
    its request, stdio fds and connection."""
    import gc
    import importlib

    environ_before = {k: v for k, v in os.environ.items() if k.startswith(STARTUP_PREFIXES)}
    for name in PRELOAD:
        importlib.import_module(name)
    environ_after = {k: v for k, v in os.environ.items() if k.startswith(STARTUP_PREFIXES)}
    if environ_after != environ_before:  # a test process that imported it would differ
        changed = sorted(set(environ_after.items()) ^ set(environ_before.items()))
        raise RuntimeError(f"a preloaded module changed start-up variables: {changed}")
    if threading.active_count() != 1:  # a fork copies only the calling thread
        raise RuntimeError(f"a preloaded module started a thread: {threading.enumerate()}")
    # What the imports made stays out of the forked processes' garbage collections: a collection
    # that walks it writes to every page, undoing copy-on-write (gc.freeze's documented use).
    gc.collect()
    gc.freeze()

    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the waiters
    owner_fd = os.pidfd_open(owner)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    with selectors.DefaultSelector() as sel:
        sel.register(server, selectors.EVENT_READ)
        sel.register(owner_fd, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fileobj == owner_fd:  # the test session is over
                    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
                    os._exit(0)
                conn, _ = server.accept()
                msg, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 2)
                if not msg:  # a probe: is the server there?
                    conn.close()
                    continue
                if os.fork() == 0:
                    server.close()
                    os.close(owner_fd)
                    return _wait_for_run(json.loads(msg), fds, conn)
                for fd in fds:
                    os.close(fd)
                conn.close()


def _wait_for_run(request: dict, fds: list[int], conn: socket.socket):
    """In the waiter: forks the CLI process and reports how it ended."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        return request, fds, conn
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        conn.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
    os._exit(0)


def _become(request: dict, fds: list[int], conn: socket.socket) -> None:
    """Turns the forked process into ``python -m <module> <args>`` as the request describes."""
    import random

    if request["new_session"]:
        os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((devnull, 0), (fds[0], 1), (fds[1], 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for name in request["blocked"]:
        if sys.modules.get(name) is not None:
            sys.stderr.write(f"warm_cli: {name} is already imported; block it in a cold start\n")
            os._exit(70)
        sys.modules[name] = None
    sys.argv = [request["module"], *request["args"]]
    sys.path[0] = request["cwd"]
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    conn.send(json.dumps({"pid": os.getpid()}).encode())
    conn.close()


if __name__ == "__main__":
    import runpy

    _request, _fds, _conn = _serve(sys.argv[1], int(sys.argv[2]))
    _become(_request, _fds, _conn)
    del _request, _fds, _conn
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
