"""What runs on the submitting machine (connect, submit, wait) and in each Ray worker
(:func:`run_in_worker`): Hydra's ``run_job`` with the driver's singletons, as Hydra's own
joblib and Ray launchers do."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

if TYPE_CHECKING:
    from hydra_plugins.sparsify_ray_launcher.ray_launcher import RayLauncher

log = logging.getLogger(__name__)

#: Seconds of each wait for the jobs (ray.get would not let SIGTERM's handler run).
WAIT_S = 0.5
#: Seconds a stopped sweep waits for Ray to confirm its jobs are cancelled.
CANCEL_WAIT_S = 10.0


def launch(
    launcher: RayLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """Submits every job, then waits for all of them; a job whose worker died is a FAILED
    :class:`JobReturn` (the sweeper reports it), not an exception that drops the others."""
    config, context = launcher.config, launcher.hydra_context
    assert config is not None and context is not None and launcher.task_function is not None
    settings = {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in launcher.settings.items()
    }
    setup_globals()
    connect(settings)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("Ray launcher: %d jobs on %s, sweep dir %s", len(job_overrides), _where(), sweep_dir)
    env = driver_env(settings.get("forward_env") or [])
    remote = ray.remote(run_in_worker).options(**task_options(settings))
    refs, sweep_configs = [], []
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.num = idx
            sweep_config.hydra.job.id = f"ray_{idx}"
        sweep_configs.append(sweep_config)
        refs.append(
            remote.remote(
                context,
                sweep_config,
                launcher.task_function,
                Singleton.get_state(),
                env,
                str(config.hydra.runtime.cwd),
            )
        )
    try:
        pending = list(refs)
        while pending:  # short waits: a signal's handler runs between them
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=WAIT_S)
        return [_result(ref, cfg) for ref, cfg in zip(refs, sweep_configs, strict=True)]
    except BaseException as e:  # SIGTERM / Ctrl-C: the running jobs stop (KILLED) with the sweep
        for ref in refs:  # a running job's worker is killed: the sweep marks its run KILLED
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        with contextlib.suppress(BaseException):
            ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)
        cause = e.__cause__ or e.__context__
        if isinstance(e, SystemError) and cause is not None:
            # A signal handler that raised while ray.get waited: Ray wraps its exception.
            raise cause from None
        raise


def connect(settings: Mapping[str, Any]) -> None:
    """``ray.init`` once per process (a sweeper may launch several batches)."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    kwargs.update(settings.get("init") or {})
    address = settings.get("address") or os.environ.get("RAY_ADDRESS") or None
    if settings.get("runtime_env"):
        kwargs["runtime_env"] = settings["runtime_env"]
    on_sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address=address, **kwargs)
    if threading.current_thread() is threading.main_thread():
        # ray.init makes SIGTERM exit the driver at once; the runner's own handler stops the
        # sweep instead: its parent and running children end KILLED, the jobs are cancelled.
        signal.signal(signal.SIGTERM, on_sigterm)


def task_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``ray.remote(...).options()`` of each job: its resources and retries."""
    options: dict[str, Any] = {
        "num_cpus": settings.get("num_cpus", 1),
        "num_gpus": settings.get("num_gpus", 0),
        "max_retries": settings.get("max_retries", 0),
    }
    if settings.get("memory"):
        options["memory"] = settings["memory"]
    return options


def driver_env(patterns: Sequence[str]) -> dict[str, str]:
    """The submitting command's environment variables that match ``patterns``."""
    return {k: v for k, v in os.environ.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def _where() -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    return f"{len(nodes)} Ray node(s), {cpus:g} CPUs"


def _result(ref: Any, sweep_config: DictConfig) -> JobReturn:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:  # the worker died (killed, out of memory, node lost)
        log.error("job %s: %s", sweep_config.hydra.job.num, str(e).splitlines()[0])
        ret = JobReturn(overrides=list(sweep_config.hydra.overrides.task))
        ret.status = JobStatus.FAILED
        ret.return_value = RuntimeError(f"Ray task failed: {str(e).splitlines()[0]}")
        return ret


def run_in_worker(
    hydra_context: HydraContext,
    sweep_config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
    env: Mapping[str, str],
    cwd: str,
) -> JobReturn:
    """One job, in a Ray worker: the driver's Hydra state, environment and working folder
    (when this node has it: relative paths then mean what they meant on the command line)."""
    setup_globals()
    Singleton.set_state(singleton_state)
    with _environment(env), _working_dir(cwd):
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = ray.get_runtime_context().get_task_id() or "ray"
        HydraConfig.instance().set_config(sweep_config)
        return run_job(
            hydra_context=hydra_context,
            task_function=task_function,
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """Sets ``env`` for one job; a worker process runs many jobs, so it is undone after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _working_dir(path: str) -> Iterator[None]:
    old = os.getcwd()
    if os.path.isdir(path):
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
