"""Launchers that run a sweep beyond this process (``hydra/launcher=ray``, ``submitit_*``),
checked before anything starts: a launcher whose packages are missing is one line naming the
``cluster`` extra (exit 2, before Hydra composes a config it cannot find), and a Ray cluster
that does not answer is one line with its address (exit 1), before the sweep's parent run
or any job exists."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("sparsify_exp.runner")

INSTALL_HINT = "pip install 'sparsify_exp[cluster]'"

_RAY = ("ray", "hydra_plugins.sparsify_ray_launcher")
_SUBMITIT = ("submitit", "hydra_plugins.hydra_submitit_launcher")

#: ``hydra/launcher`` option -> the modules it needs (the plugins' own options and the
#: examples in ``conf/hydra/launcher/``).
NEEDS: dict[str, tuple[str, ...]] = {
    "ray": _RAY,
    "ray_cluster": _RAY,
    "submitit_local": _SUBMITIT,
    "submitit_slurm": _SUBMITIT,
    "slurm": _SUBMITIT,
    "slurm_local": _SUBMITIT,
}

#: Seconds to wait for a Ray cluster's head to accept a connection.
PROBE_TIMEOUT_S = 5.0


def launcher_in_args(args: Sequence[str]) -> str | None:
    """The option of a ``hydra/launcher=NAME`` override on the command line, if any."""
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "hydra/launcher":
            return value
    return None


def missing_launcher(name: str | None) -> str | None:
    """One line naming the extra to install when launcher ``name`` lacks a package."""
    for module in NEEDS.get(name or "", ()):
        if not _installed(module):
            return (
                f"hydra/launcher={name}: {module.rsplit('.', 1)[-1]} is not installed; "
                f"{INSTALL_HINT}"
            )
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or blocked in sys.modules
        return False


def ray_address(config: DictConfig) -> str | None:
    """The Ray address a sweep's launcher will connect to (None: not the Ray launcher, or a
    Ray of this machine's own started for the sweep)."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if not target.endswith("sparsify_ray_launcher.ray_launcher.RayLauncher"):
        return None
    address = OmegaConf.select(config, "hydra.launcher.address", default=None)
    return str(address or os.environ.get("RAY_ADDRESS") or "") or None


def unreachable_ray(address: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """One line when the head of the Ray cluster at ``address`` (``host:port`` or
    ``ray://host:port``) refuses or ignores a connection; None when it answers or the
    address is left to Ray (``auto``, ``local``)."""
    if not address or address in ("auto", "local"):
        return None
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return f"ray cluster {address}: not an address (host:port, ray://host:port or auto)"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if isinstance(e, TimeoutError | socket.timeout):
            reason = f"no answer in {timeout_s:g} s"
        return f"ray cluster {address} unreachable: {reason.lower()}"


def stop_submitit_jobs(sweep_dir: str, launcher: str, wait_s: float = 10.0) -> list[str]:
    """Cancels the jobs a stopped sweep's submitit launcher started; returns their ids.

    ``LocalLauncher`` (``submitit_local``, ``slurm_local``): each job is a process of this
    one, named by its pid under ``<sweep dir>/.submitit/``; it gets SIGTERM, which submitit
    forwards to the job (its run ends KILLED), and is waited for up to ``wait_s``.
    ``SlurmLauncher``: ``scancel`` through submitit. Other launchers: nothing to do (Ray and
    joblib stop their own workers)."""
    import signal
    import time

    folder = Path(sweep_dir) / ".submitit"
    if launcher not in ("LocalLauncher", "SlurmLauncher") or not folder.is_dir():
        return []
    ids = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if launcher == "SlurmLauncher":
        from submitit.slurm.slurm import SlurmJob

        arrays = sorted({i.split("_", 1)[0] for i in ids if i.split("_", 1)[0].isdigit()})
        for array in arrays:
            try:
                SlurmJob(folder / array, array).cancel(check=False)
            except Exception as e:  # scancel missing or refusing: the jobs run on
                log.warning("could not cancel Slurm job %s: %s", array, e)
        return arrays
    mine = [int(i) for i in ids if i.isdigit() and _parent_of(int(i)) == os.getpid()]
    for pid in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(_running(pid) for pid in mine):
        time.sleep(0.1)
    return [str(pid) for pid in mine]


def _parent_of(pid: int) -> int | None:
    """The parent pid of a live process (Linux ``/proc``), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _running(pid: int) -> bool:
    """Whether a child process still runs (reaping it when it ended)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return _parent_of(pid) is not None
    return done == 0
