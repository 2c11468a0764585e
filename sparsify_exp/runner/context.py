"""Where a job runs, read from Hydra's runtime config, so the runner and the sweep machinery
need not know Hydra's layout (and a job still runs without Hydra, e.g. in tests)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from sparsify_exp.runner.config import format_value


@dataclass
class JobInfo:
    """Where this job runs, from Hydra's runtime config (or sensible stand-ins without it)."""

    launch_dir: Path
    output_dir: Path
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    multirun: bool = False
    sweep_dir: Path | None = None
    override_dirname: str = ""
    log_file: Path | None = None


def job_info() -> JobInfo:
    """This job's :class:`JobInfo`; a fresh temporary output directory when Hydra is not set up."""
    if not HydraConfig.initialized():
        launch = Path.cwd()
        out = Path(tempfile.mkdtemp(prefix="sparsify_exp_job_"))
        return JobInfo(launch_dir=launch, output_dir=out)
    hc = HydraConfig.get()
    launch = Path(hc.runtime.cwd)
    out_dir = OmegaConf.select(hc, "runtime.output_dir", default=None)
    output = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="sparsify_exp_job_"))
    multirun = hc.mode == RunMode.MULTIRUN
    choices = {
        k: format_value(v)
        for k, v in OmegaConf.to_container(hc.runtime.choices).items()  # type: ignore[union-attr]
        if not k.startswith("hydra/") and k != "hydra"
    }
    job_name = OmegaConf.select(hc, "job.name", default=None)
    log_file = output / f"{job_name}.log" if job_name else None
    return JobInfo(
        launch_dir=launch,
        output_dir=output,
        choices=choices,
        overrides=list(hc.overrides.task),
        multirun=multirun,
        sweep_dir=absolute_under(launch, hc.sweep.dir) if multirun else None,
        override_dirname=str(OmegaConf.select(hc, "job.override_dirname", default="") or ""),
        log_file=log_file,
    )


def absolute_under(base: Path, path: str | os.PathLike) -> Path:
    """``path`` as given when absolute, else under ``base`` (Hydra's paths are relative to the
    launch directory, not to a job's working directory)."""
    p = Path(path)
    return p if p.is_absolute() else base / p


JOB_LOCK = ".job.lock"
"""Held (``flock``) by the process running or resuming the job in a folder; it says who."""


class JobFolderBusy(RuntimeError):
    """Another live process runs or resumes the job of this folder."""


class JobLock:
    """The exclusive claim of one process on a job folder: two processes resuming one run
    (or a resume of a run still going) would write the same spool, checkpoint and outputs.
    ``flock`` is released by the kernel when its process dies, so a killed job's folder is
    free again at once; the file keeps the holder's pid, host and start for the message."""

    def __init__(self, job_dir: Path, what: str):
        import fcntl
        import json
        import socket
        import time

        job_dir.mkdir(parents=True, exist_ok=True)
        self.path = job_dir / JOB_LOCK
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise JobFolderBusy(f"{job_dir} is in use: {holder(job_dir)}") from None
        body = {"pid": os.getpid(), "host": socket.gethostname(), "what": what}
        body["since"] = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(body).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def holder(job_dir: Path) -> str:
    """Who holds a job folder's lock, in words (``resuming in process 4242 on node7 since
    ...``)."""
    import json

    try:
        body = json.loads((job_dir / JOB_LOCK).read_text())
        return (
            f"{body.get('what', 'running')} in process {body['pid']} on {body['host']} "
            f"since {body['since']}"
        )
    except (OSError, ValueError, KeyError):
        return "another process holds it"


def job_folder_busy(job_dir: Path) -> str | None:
    """Who holds ``job_dir`` now, or None when it is free (checked without keeping it)."""
    import fcntl

    try:
        fd = os.open(job_dir / JOB_LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return holder(job_dir)
    finally:
        os.close(fd)
    return None


def claim_job_folder(job_dir: Path, what: str, key: str) -> JobLock:
    """This process's hold on ``job_dir`` (``what``: ``running``, ``resuming``); a
    :class:`ConfigError` naming ``key`` and the process holding it when it is taken."""
    from sparsify_exp.runner.config import ConfigError

    try:
        return JobLock(job_dir, what)
    except JobFolderBusy:
        raise ConfigError(
            [
                f"{key}: job folder {job_dir} is in use ({holder(job_dir)}); wait for that "
                "process to end or stop it"
            ]
        ) from None
