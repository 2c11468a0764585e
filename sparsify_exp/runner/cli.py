"""Entry points: ``python -m sparsify_exp`` (Hydra's command line), and in-process helpers
to compose a config or run a job from Python (notebooks, tests)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, read_write

from sparsify_exp.runner import distributed
from sparsify_exp.runner.config import ConfigError, normalize_overrides
from sparsify_exp.runner.context import absolute_under
from sparsify_exp.runner.job import run
from sparsify_exp.runner.launchers import launcher_in_args, missing_launcher
from sparsify_exp.runner.methods import conflicting_choice
from sparsify_exp.runner.signals import exit_code, is_stop, sigterm_raises, stop_reason
from sparsify_exp.runner.sweep.callback import finish_sweep, objective
from sparsify_exp.runner.tracking.store import failure_reason
from sparsify_exp.runner.tracking.uploader import RunEndedElsewhere
from sparsify_exp.runner.validate import validate

log = logging.getLogger("sparsify_exp.runner")

CONFIG_MODULE = "sparsify_exp.conf"


def _config_exit(problems: list[str]) -> None:
    """Prints the problems, one a line, and exits 2 (SystemExit passes Hydra's callbacks)."""
    sys.stderr.write(ConfigError(problems).report() + "\n")
    sys.stderr.flush()
    raise SystemExit(2)


class RunCallback(Callback):
    """Validates a single run's config before Hydra makes its output folder: a rejected
    config leaves no ``outputs/<date>/<time>/`` behind, and a folder that cannot be made
    (``hydra.run.dir`` under a file, in ``/proc``) is a one-line error too."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        problems = validate(config)
        if problems:
            _config_exit(problems)
        run_dir = absolute_under(Path(config.hydra.runtime.cwd), config.hydra.run.dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _config_exit([f"hydra.run.dir={run_dir}: cannot be created ({e.strerror or e})"])


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        distributed.prepare(cfg)
        return objective(cfg, run(cfg))  # a failure is the launcher's to report
    try:
        distributed.prepare(cfg)  # data=sharded under torchrun: the process group first
        run(cfg)
    except ConfigError as e:
        _config_exit(e.problems)
    except RunEndedElsewhere as e:  # another process ended the run: say so, stop
        log.error("stopped: %s", e)
        raise SystemExit(1) from None
    except Exception as e:  # the run is FAILED with its reason and traceback (error.txt)
        log.error("failed: %s", failure_reason(e))
        raise SystemExit(1) from None
    return None


def main() -> None:
    """``python -m sparsify_exp``: Hydra's command line. SIGTERM and Ctrl-C end it with
    128 + the signal's number, the run (a sweep's parent and running children) KILLED."""
    aborted: BaseException | None = None
    sys.argv[1:] = normalize_overrides(sys.argv[1:])
    missing = missing_launcher(launcher_in_args(sys.argv[1:]))
    if missing:  # before Hydra, which would only say it cannot find the option
        sys.stderr.write(f"{missing}\n")
        raise SystemExit(2)
    conflict = conflicting_choice(sys.argv[1:])
    if conflict:
        _config_exit([conflict])
    try:
        with sigterm_raises():
            _hydra_main()
    except BaseException as e:
        aborted = e
        if not is_stop(e):
            raise
        finish_sweep(e)
        sys.stderr.write(f"{stop_reason(e)}\n")
        raise SystemExit(exit_code(e)) from None
    finally:
        finish_sweep(aborted)  # on_multirun_end is skipped when a job raised; else a no-op


def compose_config(overrides: list[str] | None = None, *, hydra_config: bool = False) -> DictConfig:
    """The composed config for ``overrides`` (as the command line would build it), in-process."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = normalize_overrides(list(overrides or []))
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)


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
