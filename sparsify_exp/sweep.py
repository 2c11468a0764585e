"""A multirun's parent MLflow run: every job validated before any starts, the experiment and
the parent run created once (before launcher workers could race to), closed with a report.

Wired into Hydra by ``conf/config.yaml`` as ``sparsify_exp.runner.SweepCallback`` (re-exported
there); each job finds its parent through :data:`sparsify_exp.tracking.PARENT_ENV`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sparsify_exp.config import ConfigError, format_value, validate
from sparsify_exp.job_context import absolute_under
from sparsify_exp.prefetch import mlflow_ready
from sparsify_exp.process_exit import require_normal_exit

log = logging.getLogger("sparsify_exp.runner")


@dataclass
class _Sweep:
    uri: str
    run_id: str
    prev_env: str | None


_ACTIVE_SWEEP: _Sweep | None = None


def _job_overrides(config: DictConfig) -> list[list[str]] | None:
    """The override list of every job a BasicSweeper would launch (None: another sweeper)."""
    sweeper = OmegaConf.select(config, "hydra.sweeper._target_", default="")
    if not str(sweeper).endswith("basic_sweeper.BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = list(config.hydra.overrides.task)
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    args = [f"{k}={v}" for k, v in params.items()] + args
    parsed = OverridesParser.create().parse_overrides(args)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for batch in batches for job in batch]


class SweepCallback(Callback):
    """Validates every job of a sweep before any starts, and owns the sweep's parent run.

    ``on_multirun_start``: composes and validates each job (a config mistake stops the sweep
    with the full list, exit code 2); creates the experiment and the parent run (tag
    ``sparsify.sweep=true``) so that parallel workers neither race to create them nor migrate
    the sqlite schema at once; exports the parent id to the workers.
    ``on_multirun_end``: marks the parent FINISHED (FAILED if a job failed) and calls
    ``sparsify_exp.report.write_sweep_report(client, parent_run_id)`` when it exists.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        require_normal_exit()
        jobs = _validate_sweep(config)  # SystemExit(2) on a config mistake
        try:
            _start_sweep(config, jobs)
        except Exception as e:  # Hydra would downgrade it to a warning: say what it means
            log.error(
                "could not create the sweep's parent run (%s: %s); jobs log without a parent",
                type(e).__name__,
                e,
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish_sweep()


def _start_sweep(config: DictConfig, jobs: list[list[str]] | None) -> None:
    global _ACTIVE_SWEEP
    mlflow_ready()
    from mlflow.tracking import MlflowClient

    from sparsify_exp import tracking as tr

    launch = Path(config.hydra.runtime.cwd)
    uri = tr.resolve_tracking_uri(config.mlflow.tracking_uri, launch)
    client = MlflowClient(tracking_uri=uri)
    exp_id = tr.ensure_experiment(client, config.mlflow.experiment)
    sweep_dir = str(absolute_under(launch, config.hydra.sweep.dir))
    overrides = " ".join(config.hydra.overrides.task)
    choices = {
        f"sparsify.choice.{k}": format_value(v)
        for k, v in OmegaConf.to_container(config.hydra.runtime.choices).items()  # type: ignore[union-attr]
        if not k.startswith("hydra/") and k != "hydra"
    }
    tags = {
        **choices,
        "mlflow.runName": f"sweep: {overrides}" if overrides else None,
        "sparsify.overrides": overrides,
        "sparsify.jobs": str(len(jobs)) if jobs is not None else "unknown",
        "sparsify.launcher": str(
            OmegaConf.select(config, "hydra.launcher._target_", default="")
        ).rsplit(".", 1)[-1],
        **tr.git_info(Path(__file__).resolve().parent),
        **{str(k): str(v) for k, v in (config.mlflow.get("tags") or {}).items()},
    }
    run_id = tr.start_sweep_run(
        client, exp_id, sweep_dir, {k: v for k, v in tags.items() if v is not None}
    )
    prev = os.environ.get(tr.PARENT_ENV)
    os.environ[tr.PARENT_ENV] = f"{run_id}|{sweep_dir}"
    _ACTIVE_SWEEP = _Sweep(uri, run_id, prev)
    log.info(
        "sweep parent run %s: %s jobs (experiment %r, %s)",
        run_id,
        tags["sparsify.jobs"],
        config.mlflow.experiment,
        uri,
    )


def _validate_sweep(config: DictConfig) -> list[list[str]] | None:
    from hydra import compose

    try:
        jobs = _job_overrides(config)
    except Exception as e:  # Hydra reports bad override syntax itself, later
        log.debug("could not expand the sweep: %s", e)
        return None
    problems: list[str] = []
    config_name = OmegaConf.select(config, "hydra.job.config_name", default=None) or "config"
    for overrides in jobs or [list(config.hydra.overrides.task)]:
        try:
            job_cfg = compose(config_name=config_name, overrides=overrides)
        except Exception as e:
            line = f"{' '.join(overrides)}: {str(e).splitlines()[0]}"
            if line not in problems:
                problems.append(line)
            continue
        for p in validate(job_cfg):
            if p not in problems:
                problems.append(p)
    if problems:
        sys.stderr.write(ConfigError(problems).report() + "\n")
        sys.stderr.flush()
        raise SystemExit(2)  # not an Exception: Hydra would turn that into a warning
    return jobs


def finish_sweep(aborted: BaseException | None = None) -> None:
    """Closes the active sweep's parent run and writes its report (idempotent: a no-op when no
    sweep is active, so ``main`` can call it after a job raised and skipped
    ``on_multirun_end``)."""
    global _ACTIVE_SWEEP
    sweep, _ACTIVE_SWEEP = _ACTIVE_SWEEP, None
    if sweep is None:
        return
    mlflow_ready()
    from mlflow.tracking import MlflowClient

    from sparsify_exp import tracking as tr

    if sweep.prev_env is None:
        os.environ.pop(tr.PARENT_ENV, None)
    else:
        os.environ[tr.PARENT_ENV] = sweep.prev_env
    client = MlflowClient(tracking_uri=sweep.uri)
    try:
        _, children = tr.find_sweep_runs(client, sweep.run_id)
        statuses = [r.info.status for r in children]
        failed = sum(s != "FINISHED" for s in statuses)
        client.set_tag(sweep.run_id, "sparsify.jobs_finished", str(len(statuses) - failed))
        client.set_tag(sweep.run_id, "sparsify.jobs_failed", str(failed))
        try:
            from sparsify_exp.report import write_sweep_report
        except ImportError as e:
            log.warning("no sweep report: sparsify_exp.report.write_sweep_report missing (%s)", e)
        else:
            try:
                write_sweep_report(client, sweep.run_id)
                log.info("sweep report logged to parent run %s", sweep.run_id)
            except Exception as e:
                log.warning(
                    "sweep report for parent run %s failed: %s: %s",
                    sweep.run_id,
                    type(e).__name__,
                    e,
                )
        if aborted is not None or failed:
            reason = (
                f"{failed} of {len(statuses)} jobs did not finish"
                if failed
                else f"sweep aborted: {type(aborted).__name__}: {aborted}"
            )
            client.set_tag(sweep.run_id, tr.FAILURE_TAG, reason)
            client.set_terminated(sweep.run_id, "FAILED")
        else:
            client.set_terminated(sweep.run_id, "FINISHED")
    except Exception as e:
        log.warning("could not close sweep parent run %s: %s", sweep.run_id, e)
