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
