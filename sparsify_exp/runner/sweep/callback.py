"""A multirun's parent MLflow run: every job validated before any starts, the experiment and the
parent run created once (before launcher workers could race to), closed with a report.

Wired into Hydra by ``conf/config.yaml`` (``hydra.callbacks``); each job finds its parent
through :data:`~sparsify_exp.runner.tracking.store.PARENT_ENV`, or by the sweep folder tag when
it runs on another machine. Works with any sweeper: Hydra's basic sweeper has its jobs expanded
and validated up front; a sweeper that picks its own values (``hydra/sweeper=optuna``, ...) has
a sample of the jobs it could launch validated up front (each choice, a range's first and last
values, an interval's ends) and each trial validated when it starts. :func:`objective` is what a
job returns to a sweeper that optimizes; the sweeper's ``optimization_results.yaml``, when it
writes one, goes to the parent run's ``report/`` with the sweep report.

An optuna search (hydra-optuna-sweeper; ``+`` adds keys to the empty ``objective.max``)::

python -m sparsify_exp -m hydra/sweeper=optuna hydra.sweeper.n_trials=20 \
hydra.sweeper.direction=maximize 'sparsifier.sparsity_level=interval(0.05,0.99)' \
'+objective.max={fidelity/rel_error: 0.5}'"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from mlflow.entities import Param
from omegaconf import DictConfig, ListConfig, OmegaConf

from sparsify_exp.runner import methods
from sparsify_exp.runner.config import ConfigError, format_value
from sparsify_exp.runner.context import absolute_under
from sparsify_exp.runner.signals import is_stop
from sparsify_exp.runner.sweep import naming
from sparsify_exp.runner.sweep.answer import log_answer
from sparsify_exp.runner.sweep.views import run_page, view_page
from sparsify_exp.runner.tracking import store as tr
from sparsify_exp.runner.validate import validate

log = logging.getLogger("sparsify_exp.runner")

#: The ``hydra.sweeper._target_`` of Hydra's default sweeper, as the composed config names it
#: (compared as a string; nothing of Hydra's internals is imported).
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

#: At most this many sampled jobs of a sweeper that picks its own values are validated as
#: every combination of the sampled values; beyond, each sampled value is used at least once.
MAX_SAMPLED_JOBS = 32

#: Where optimizing sweepers keep their trial budget (the parent run's ``sparsify.jobs``):
#: optuna, nevergrad, ax.
TRIAL_BUDGET_KEYS = (
    "hydra.sweeper.n_trials",
    "hydra.sweeper.optim.budget",
    "hydra.sweeper.ax_config.max_trials",
)

#: What an optimizing sweeper may write to the sweep dir (optuna, nevergrad and ax do).
RESULTS_FILE = "optimization_results.yaml"


@dataclass
class _Sweep:
    uri: str
    run_id: str
    sweep_dir: str
    prev_env: str | None
    pick: dict[str, Any] = field(default_factory=dict)
    swept: list[str] = field(default_factory=list)
    beater: Any = None
    launcher: str = ""


_ACTIVE_SWEEP: _Sweep | None = None


def expand_jobs(config: DictConfig) -> tuple[list[list[str]], bool]:
    """``(override lists, complete)`` of a sweep's (multirun) config.

    Hydra's basic sweeper: every job, as it will launch them (``complete``; the cartesian
    product of ``hydra.sweeper.params`` and the command line, the later of two overrides of a
    key winning). A sweeper that picks its own values: a sample of the jobs it could launch,
    from each swept key's choices, a range's first and last values, an interval's ends (every
    combination up to :data:`MAX_SAMPLED_JOBS` jobs, else each value at least once); no job
    when a ``hydra.sweeper.params`` value is in the sweeper's own (non-string) syntax.
    Raises on an override Hydra cannot parse or expand.
    """
    basic = OmegaConf.select(config, "hydra.sweeper._target_", default="") == BASIC_SWEEPER
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    if not basic and any(isinstance(v, (DictConfig, ListConfig)) for v in params.values()):
        return [], False
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create(config_loader=_config_loader()).parse_overrides(args)
    by_key: dict[str, list[str]] = {}
    for o in parsed:
        key = o.get_key_element()
        if not o.is_sweep_override():
            values = [o.get_value_element_as_str()]
        elif basic and not o.is_discrete_sweep():
            raise ValueError(f"the basic sweeper cannot sweep {o.input_line}")
        else:
            values = list(o.sweep_string_iterator()) if basic else _sample_values(o)
        by_key[key] = [f"{key}={v}" for v in values]
    lists = list(by_key.values())
    if basic or math.prod(len(v) for v in lists) <= MAX_SAMPLED_JOBS:
        return [list(job) for job in itertools.product(*lists)], basic
    width = max(len(v) for v in lists)
    return [[v[i % len(v)] for v in lists] for i in range(width)], False


def _sample_values(override: Override) -> list[str]:
    """Values a sweeper could give a swept key: every choice, a range's first and last
    values, an interval's ends (integers when tagged ``int``)."""
    if override.is_discrete_sweep():
        values = list(override.sweep_string_iterator())
        return (
            values if override.is_choice_sweep() else list(dict.fromkeys(values[:1] + values[-1:]))
        )
    if override.is_interval_sweep():
        iv = override.value()
        as_type = int if "int" in iv.tags else float
        return [str(as_type(iv.start)), str(as_type(iv.end))]
    raise ValueError(f"cannot sample the values of {override.input_line}")


def _config_loader() -> Any:
    """Hydra's config loader while Hydra runs (it expands ``glob(...)`` group sweeps)."""
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    return gh.config_loader() if gh.is_initialized() else None


class SweepCallback(Callback):
    """Validates a sweep's jobs before any starts, and owns the sweep's parent run.

    ``on_multirun_start``: composes and validates each job (a config mistake stops the sweep
    with the full list, exit code 2); creates the experiment and the parent run (tag
    ``sparsify.sweep=true``); exports the parent id to the workers.
    ``on_multirun_end``: marks the parent FINISHED (FAILED if a job failed) and logs the
    sweep report to it.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from sparsify_exp.runner.tracking.reachability import StoreUnreachable

        jobs, complete = _validate_sweep(config)  # SystemExit(2) on a config mistake
        _check_launcher(config)
        try:
            _start_sweep(config, len(jobs) if complete else None)
        except StoreUnreachable as e:  # every job would fail the same way: stop here
            sys.stderr.write(f"{e}\n")
            raise SystemExit(1) from None
        except Exception as e:  # Hydra would downgrade it to a warning: stop before any job
            sys.stderr.write(
                f"could not create the sweep's parent run ({tr.failure_reason(e)}); "
                "no job was started\n"
            )
            raise SystemExit(1) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish_sweep()


def _check_launcher(config: DictConfig) -> None:
    """Exits with one line when the launcher lacks a package (2) or its Ray cluster does
    not answer (1), before the parent run or any job exists."""
    from sparsify_exp.runner import launchers

    choice = OmegaConf.select(config, "hydra.runtime.choices", default={}).get("hydra/launcher")
    missing = launchers.missing_launcher(choice)
    if missing:
        sys.stderr.write(f"{missing}\n")
        raise SystemExit(2)
    unreachable = launchers.unreachable_ray(launchers.ray_address(config))
    if unreachable:
        sys.stderr.write(f"{unreachable}\n")
        raise SystemExit(1)


def _validate_sweep(config: DictConfig) -> tuple[list[list[str]], bool]:
    from hydra import compose

    try:
        jobs, complete = expand_jobs(config)
    except Exception as e:  # Hydra reports bad override syntax itself, later
        log.debug("could not expand the sweep: %s", e)
        jobs, complete = [], False
    conflict = methods.conflicting_choice(list(config.hydra.overrides.task))
    problems: list[str] = [conflict] if conflict else []
    lacking: dict[str, list[str]] = {}  # a key some jobs' method has no place for
    having: dict[str, list[str]] = {}
    config_name = OmegaConf.select(config, "hydra.job.config_name", default=None) or "config"
    for overrides in [] if conflict else jobs:
        method = methods.method_of(overrides)
        try:
            job_cfg = compose(config_name=config_name, overrides=overrides)
        except Exception as e:
            key = methods.missing_key(e)
            if key is not None:
                lacking.setdefault(key, []).append(method)
            else:
                problems.append(f"{' '.join(overrides)}: {str(e).splitlines()[0]}")
            continue
        for o in overrides:
            having.setdefault(o.split("=", 1)[0].lstrip("+~"), []).append(method)
        problems.extend(validate(job_cfg))
    problems = methods.missing_key_lines(lacking, having) + problems
    problems.extend(_sweeper_problems(config))
    if problems:
        sys.stderr.write(ConfigError(list(dict.fromkeys(problems))).report() + "\n")
        if jobs and not complete:
            sys.stderr.write(
                f"(checked {len(jobs)} job(s) the sweeper could launch: each choice, a range's "
                "first and last values, an interval's ends)\n"
            )
        sys.stderr.flush()
        raise SystemExit(2)  # not an Exception: Hydra would turn that into a warning
    return jobs, complete


def _direction(config: DictConfig) -> Any:
    """``hydra.sweeper.direction`` as a string, or a list of them (None if not set)."""
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if isinstance(direction, ListConfig):
        return [str(getattr(d, "name", d)) for d in direction]
    return None if direction is None else str(getattr(direction, "name", direction))


def _sweeper_problems(config: DictConfig) -> list[str]:
    direction = _direction(config)
    if isinstance(direction, list) and len(direction) != 1:
        return [
            f"hydra.sweeper.direction={format_value(direction)}: a job returns one value "
            "(objective.metric); give one direction"
        ]
    return []


def _start_sweep(config: DictConfig, n_jobs: int | None) -> None:
    global _ACTIVE_SWEEP

    from sparsify_exp.runner.tracking import heartbeat, reachability

    launch = Path(config.hydra.runtime.cwd)
    uri = tr.resolve_tracking_uri(config.mlflow.tracking_uri, launch)
    reachability.configure_http(uri, float(config.mlflow.request_timeout_s))
    reachability.quiet_store_loggers()
    reachability.check_reachable(uri, timeout_s=min(5.0, float(config.mlflow.request_timeout_s)))
    client = tr.open_client(uri)
    exp_id = tr.ensure_experiment(client, config.mlflow.experiment)
    heartbeat_s = float(config.mlflow.get("heartbeat_s") or 30)
    try:  # a sweep killed earlier left its parent RUNNING: mark it now
        stale_s = config.mlflow.get("heartbeat_stale_s") or 10 * heartbeat_s
        heartbeat.reap_dead_runs(client, exp_id, float(stale_s))
    except Exception as e:  # never stops a sweep: the next start tries again
        log.warning("could not check for runs whose process died: %s", e)
    sweep_dir = str(absolute_under(launch, config.hydra.sweep.dir))
    overrides = " ".join(config.hydra.overrides.task)
    for key in TRIAL_BUDGET_KEYS:
        if n_jobs is None:
            n_jobs = OmegaConf.select(config, key, default=None)
    choices: dict[str, Any] = OmegaConf.to_container(config.hydra.runtime.choices)  # type: ignore[assignment]
    swept = dict(_swept(config))
    tags = {
        **{
            f"{tr.CHOICE_TAG_PREFIX}{k}": format_value(v)
            for k, v in naming.choice_tags(choices, swept).items()
        },
        "mlflow.runName": naming.sweep_name(choices, swept),
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
        heartbeat.HEARTBEAT_TAG: str(int(time.time())),
    }
    run_id = tr.start_sweep_run(
        client, exp_id, sweep_dir, {k: v for k, v in tags.items() if v is not None}
    )
    client.log_batch(  # what the sweep varies, over which values: the parent's params
        run_id,
        params=[Param(f"sweep.{k}", str(v)[:6000]) for k, v in _swept(config)]
        + [Param("sweep.jobs", tags["sparsify.jobs"])],
    )
    prev = os.environ.get(tr.PARENT_ENV)
    os.environ[tr.PARENT_ENV] = f"{run_id}|{sweep_dir}"
    os.environ[tr.SWEPT_ENV] = ",".join(k for k, _ in _swept(config))
    pick = OmegaConf.select(config, "sweep.pick", default=None)
    _ACTIVE_SWEEP = _Sweep(
        uri,
        run_id,
        sweep_dir,
        prev,
        OmegaConf.to_container(pick) if pick is not None else {},  # type: ignore[arg-type]
        [k for k, _ in _swept(config)],
        heartbeat.Beater(client, run_id, heartbeat_s),
        tags["sparsify.launcher"],
    )
    log.info(
        "sweep parent run %s: %s jobs (experiment %r, %s)",
        run_id,
        tags["sparsify.jobs"],
        config.mlflow.experiment,
        uri,
    )


def _swept(config: DictConfig) -> list[tuple[str, str]]:
    """``(key, values)`` of each override the sweep varies, as typed."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    args = [f"{k}={v}" for k, v in params.items() if isinstance(v, str)]
    args += list(config.hydra.overrides.task)
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:
        return []
    return [
        (o.get_key_element().lstrip("+~"), o.input_line.split("=", 1)[1])
        for o in parsed
        if o.is_sweep_override()
    ]


def objective(cfg: DictConfig, run_id: str) -> float:
    """What a job returns to an optimizing sweeper: the run's last ``objective.metric``, or
    ``objective.infeasible`` when a metric in ``objective.max`` ended above its bound (or is
    missing: a warning names it). NaN when the run has no ``objective.metric`` (optuna then
    marks the trial failed)."""

    spec: Mapping[str, Any] = cfg.get("objective") or {}
    uri = tr.resolve_tracking_uri(cfg.mlflow.tracking_uri, _launch_dir())
    metrics = tr.open_client(uri).get_run(run_id).data.metrics
    metric = str(spec.get("metric", tr.SPARSITY_KEY))
    bounds = {str(k): float(v) for k, v in (spec.get("max") or {}).items()}
    missing = [k for k in (metric, *bounds) if k not in metrics]
    if missing:
        log.warning(
            "objective: run %s has no metric %s (it has: %s)",
            run_id,
            ", ".join(missing),
            ", ".join(sorted(metrics)) or "none",
        )
    for key, bound in bounds.items():
        if not metrics.get(key, math.inf) <= bound:
            return float(spec.get("infeasible", -1.0))
    return float(metrics.get(metric, math.nan))


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

    from sparsify_exp.runner.sweep.report import ARTIFACT_DIR as REPORT_DIR
    from sparsify_exp.runner.sweep.report import write_sweep_report

    if sweep.beater is not None:
        sweep.beater.stop()
    os.environ.pop(tr.SWEPT_ENV, None)
    if sweep.prev_env is None:
        os.environ.pop(tr.PARENT_ENV, None)
    else:
        os.environ[tr.PARENT_ENV] = sweep.prev_env
    client = tr.open_client(sweep.uri)
    stopped = aborted is not None and is_stop(aborted)
    if stopped:  # jobs in processes of their own stop with the sweep
        from sparsify_exp.runner.launchers import stop_submitit_jobs

        try:
            cancelled = stop_submitit_jobs(sweep.sweep_dir, sweep.launcher)
            if cancelled:
                log.info("cancelled %d submitit job(s): %s", len(cancelled), ", ".join(cancelled))
        except Exception as e:
            log.warning("could not cancel the sweep's submitit jobs: %s", e)
    try:
        _, children = tr.find_sweep_runs(client, sweep.run_id)
        if stopped:  # jobs the launcher was running when the signal came end with it
            for child in children:
                if child.info.status == "RUNNING":
                    reason = f"sweep stopped: {tr.failure_reason(aborted)}"  # type: ignore[arg-type]
                    client.set_tag(child.info.run_id, tr.FAILURE_TAG, reason)
                    client.set_terminated(child.info.run_id, "KILLED")
            _, children = tr.find_sweep_runs(client, sweep.run_id)
        failed = sum(r.info.status != "FINISHED" for r in children)
        client.set_tag(sweep.run_id, "sparsify.jobs_finished", str(len(children) - failed))
        client.set_tag(sweep.run_id, "sparsify.jobs_failed", str(failed))
        answer, view = log_answer(client, sweep.run_id, sweep.pick, sweep.swept, children)
        try:
            write_sweep_report(client, sweep.run_id)
        except Exception as e:
            log.warning("sweep report for parent run %s failed: %s", sweep.run_id, e)
        results = Path(sweep.sweep_dir) / RESULTS_FILE
        if results.is_file():
            client.log_artifact(sweep.run_id, str(results), artifact_path=REPORT_DIR)
        if aborted is not None or failed:
            reason = (
                tr.failure_reason(aborted)  # type: ignore[arg-type]
                if stopped
                else f"{failed} of {len(children)} jobs did not finish"
                if failed
                else f"sweep aborted: {tr.failure_reason(aborted)}"  # type: ignore[arg-type]
            )
            client.set_tag(sweep.run_id, tr.FAILURE_TAG, reason)
            client.set_terminated(sweep.run_id, "KILLED" if stopped else "FAILED")
        else:
            client.set_terminated(sweep.run_id, "FINISHED")
        from sparsify_exp.runner.tracking import heartbeat

        heartbeat.delete_tags(client, sweep.run_id, heartbeat.HEARTBEAT_TAG)  # ended: no beat
        parent = client.get_run(sweep.run_id)
        exp_id = parent.info.experiment_id
        url = (
            view_page(sweep.uri, exp_id, view)
            if view
            else run_page(sweep.uri, exp_id, sweep.run_id)
        )
        log.info(
            "sweep %s: %d of %d jobs finished; picked %s; %s: %s",
            parent.info.status,
            len(children) - failed,
            len(children),
            answer,
            "the trade-off" if view else "parent run",
            url,
        )
    except Exception as e:
        log.warning("could not close sweep parent run %s: %s", sweep.run_id, e)
