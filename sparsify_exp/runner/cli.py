"""Entry points: ``python -m sparsify_exp`` (Hydra's command line), and in-process helpers
to compose a config or run a job from Python (notebooks, tests)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, read_write

from sparsify_exp.runner.config import ConfigError
from sparsify_exp.runner.job import run
from sparsify_exp.runner.sweep import finish_sweep, objective

CONFIG_MODULE = "sparsify_exp.conf"


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run_id = run(cfg)
    except ConfigError as e:
        if multirun:
            raise  # a worker must not exit; the launcher reports the job's error
        sys.stderr.write(e.report() + "\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    return objective(cfg, run_id) if multirun else None


def main() -> None:
    """``python -m sparsify_exp``: Hydra's command line."""
    aborted: BaseException | None = None
    try:
        _hydra_main()
    except BaseException as e:
        aborted = e
        raise
    finally:
        finish_sweep(aborted)  # on_multirun_end is skipped when a job raised; else a no-op


def compose_config(overrides: list[str] | None = None, *, hydra_config: bool = False) -> DictConfig:
    """The composed config for ``overrides`` (as the command line would build it), in-process."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=list(overrides or []), return_hydra_config=hydra_config)
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return compose("config", overrides=list(overrides or []), return_hydra_config=hydra_config)


def run_overrides(
    overrides: list[str] | None = None, output_dir: str | os.PathLike | None = None
) -> str:
    """Runs one job in-process (no sweep, no Hydra logging set-up); returns the MLflow run id.

    ``run_overrides(["sparsifier=first_row", "data=embeddings"])``.
    """
    cfg = compose_config(overrides, hydra_config=True)
    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="sparsify_exp_job_"))
    with read_write(cfg):
        cfg.hydra.runtime.output_dir = str(out.resolve())
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.job.name = "run"
    hc = HydraConfig.instance()
    previous = hc.cfg
    hc.set_config(cfg)
    try:
        return run(cfg)
    finally:
        hc.cfg = previous
