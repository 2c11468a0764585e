"""A multirun's parent MLflow run: every job validated before any starts, the experiment and
the parent run created once (before launcher workers could race to), closed with a report.

Wired into Hydra by ``conf/config.yaml`` (``hydra.callbacks``); each job finds its parent
through :data:`sparsify_exp.runner.tracking.PARENT_ENV`, or by the sweep folder tag when it runs
on another machine. Works with any sweeper: Hydra's basic sweeper has its jobs expanded and
validated up front; others (optuna, ...) have the overrides common to every job validated up
front and each trial validated when it starts. :func:`objective` is what a job returns to a
sweeper that optimizes.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sparsify_exp.runner import tracking as tr
from sparsify_exp.runner.config import ConfigError, format_value, validate
from sparsify_exp.runner.context import absolute_under

log = logging.getLogger("sparsify_exp.runner")

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class _Sweep:
    uri: str
    run_id: str
    prev_env: str | None


_ACTIVE_SWEEP: _Sweep | None = None


def expand_jobs(config: DictConfig) -> tuple[list[list[str]], bool]:
    """``(override lists, complete)``: every job of a basic sweep (``complete``), else the one
    list of overrides that every job shares (the sweeper picks the swept values itself)."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(args)
    basic = OmegaConf.select(config, "hydra.sweeper._target_", default="") == BASIC_SWEEPER
    if not basic or any(o.is_sweep_override() and not o.is_discrete_sweep() for o in parsed):
        return [[o.input_line for o in parsed if not o.is_sweep_override()]], False
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in parsed
    ]
    return [list(job) for job in itertools.product(*choices)], True


class SweepCallback(Callback):
    """Validates a sweep's jobs before any starts, and owns the sweep's parent run.

    ``on_multirun_start``: composes and validates each job (a config mistake stops the sweep
    with the full list, exit code 2); creates the experiment and the parent run (tag
    ``sparsify.sweep=true``); exports the parent id to the workers.
    ``on_multirun_end``: marks the parent FINISHED (FAILED if a job failed) and logs the
    sweep report to it.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        jobs, complete = _validate_sweep(config)  # SystemExit(2) on a config mistake
        try:
            _start_sweep(config, len(jobs) if complete else None)
        except Exception as e:  # Hydra would downgrade it to a warning: say what it means
            log.error(
                "could not create the sweep's parent run (%s: %s); jobs log without a parent",
                type(e).__name__,
                e,
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish_sweep()


def _validate_sweep(config: DictConfig) -> tuple[list[list[str]], bool]:
    from hydra import compose

    try:
        jobs, complete = expand_jobs(config)
    except Exception as e:  # Hydra reports bad override syntax itself, later
        log.debug("could not expand the sweep: %s", e)
        return [], False
    problems: list[str] = []
    config_name = OmegaConf.select(config, "hydra.job.config_name", default=None) or "config"
    for overrides in jobs:
        try:
            job_cfg = compose(config_name=config_name, overrides=overrides)
        except Exception as e:
            problems.append(f"{' '.join(overrides)}: {str(e).splitlines()[0]}")
            continue
        problems.extend(validate(job_cfg))
    if problems:
        sys.stderr.write(ConfigError(list(dict.fromkeys(problems))).report() + "\n")
        sys.stderr.flush()
        raise SystemExit(2)  # not an Exception: Hydra would turn that into a warning
    return jobs, complete


def _start_sweep(config: DictConfig, n_jobs: int | None) -> None:
    global _ACTIVE_SWEEP
    from mlflow.tracking import MlflowClient

    launch = Path(config.hydra.runtime.cwd)
    uri = tr.resolve_tracking_uri(config.mlflow.tracking_uri, launch)
    client = MlflowClient(tracking_uri=uri)
    exp_id = tr.ensure_experiment(client, config.mlflow.experiment)
    sweep_dir = str(absolute_under(launch, config.hydra.sweep.dir))
    overrides = " ".join(config.hydra.overrides.task)
    if n_jobs is None:
        n_jobs = OmegaConf.select(config, "hydra.sweeper.n_trials", default=None)
    choices = OmegaConf.to_container(config.hydra.runtime.choices)
    tags = {
        **{
            f"{tr.CHOICE_TAG_PREFIX}{k}": format_value(v)
            for k, v in choices.items()  # type: ignore[union-attr]
            if not k.startswith("hydra/") and k != "hydra"
        },
        "mlflow.runName": f"sweep: {overrides}" if overrides else None,
        tr.OVERRIDES_TAG: overrides,
        "sparsify.jobs": str(n_jobs) if n_jobs is not None else "unknown",
        "sparsify.sweeper": str(
            OmegaConf.select(config, "hydra.sweeper._target_", default="")
        ).rsplit(".", 1)[-1],
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


def objective(cfg: DictConfig, run_id: str) -> float:
    """What a job returns to an optimizing sweeper: the run's last ``objective.metric``, or
    ``objective.infeasible`` when a metric in ``objective.max`` ended above its bound."""
    from mlflow.tracking import MlflowClient

    spec: Mapping[str, Any] = cfg.get("objective") or {}
    uri = tr.resolve_tracking_uri(cfg.mlflow.tracking_uri, _launch_dir())
    metrics = MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    value = metrics.get(str(spec.get("metric", tr.SPARSITY_KEY)), math.nan)
    for key, bound in (spec.get("max") or {}).items():
        if not metrics.get(str(key), math.inf) <= float(bound):
            return float(spec.get("infeasible", -1.0))
    return float(value)


def _launch_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()


def finish_sweep(aborted: BaseException | None = None) -> None:
    """Closes the active sweep's parent run and logs its report (idempotent: a no-op when no
    sweep is active, so ``main`` can call it after a job raised and skipped
    ``on_multirun_end``)."""
    global _ACTIVE_SWEEP
    sweep, _ACTIVE_SWEEP = _ACTIVE_SWEEP, None
    if sweep is None:
        return
    from mlflow.tracking import MlflowClient

    from sparsify_exp.runner.report import write_sweep_report

    if sweep.prev_env is None:
        os.environ.pop(tr.PARENT_ENV, None)
    else:
        os.environ[tr.PARENT_ENV] = sweep.prev_env
    client = MlflowClient(tracking_uri=sweep.uri)
    try:
        _, children = tr.find_sweep_runs(client, sweep.run_id)
        failed = sum(r.info.status != "FINISHED" for r in children)
        client.set_tag(sweep.run_id, "sparsify.jobs_finished", str(len(children) - failed))
        client.set_tag(sweep.run_id, "sparsify.jobs_failed", str(failed))
        try:
            write_sweep_report(client, sweep.run_id)
            log.info("sweep report logged to parent run %s", sweep.run_id)
        except Exception as e:
            log.warning("sweep report for parent run %s failed: %s", sweep.run_id, e)
        if aborted is not None or failed:
            reason = (
                f"{failed} of {len(children)} jobs did not finish"
                if failed
                else f"sweep aborted: {tr.failure_reason(aborted)}"  # type: ignore[arg-type]
            )
            client.set_tag(sweep.run_id, tr.FAILURE_TAG, reason)
            client.set_terminated(sweep.run_id, "FAILED")
        else:
            client.set_terminated(sweep.run_id, "FINISHED")
    except Exception as e:
        log.warning("could not close sweep parent run %s: %s", sweep.run_id, e)
