"""The experiment runner: ``python -m sparsify_exp [group=option ...] [key=value ...]``.

compose (Hydra) -> validate (all problems at once) -> build data, sparsifier (``add_data`` with
per-name config), schedule, evaluators -> for each step: ``step()``, schedule, log -> masks,
pictures, per-name table -> ``squash_mask()`` -> write the sparsified data -> finish.

Every job is one MLflow run; a multirun (``-m``) also gets a parent run, created with the
experiment by :class:`SweepCallback` before any launcher worker starts.

This module runs one job and holds the entry points; the rest lives beside it (and what is
public is re-exported here): :mod:`~sparsify_exp.sweep` (the parent run),
:mod:`~sparsify_exp.run_artifacts` (table, sizes, mask pictures), :mod:`~sparsify_exp.mask_churn`,
:mod:`~sparsify_exp.job_context`, :mod:`~sparsify_exp.prefetch`, :mod:`~sparsify_exp.process_exit`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from sparsify_exp.config import ConfigError, validate
from sparsify_exp.job_context import JobInfo, job_info
from sparsify_exp.mask_churn import MaskChurn
from sparsify_exp.prefetch import mlflow_ready, start_prefetch
from sparsify_exp.process_exit import fast_exit
from sparsify_exp.run_artifacts import mask_images, storage_sizes, write_table
from sparsify_exp.sweep import SweepCallback, finish_sweep

__all__ = [
    "SweepCallback",
    "compose_config",
    "fast_exit",
    "main",
    "run",
    "run_overrides",
    "start_prefetch",
]

log = logging.getLogger("sparsify_exp.runner")

SUMMARY_KEYS = ("overall", "min", "mean", "max")


# --------------------------------------------------------------------------- the run


def run(cfg: DictConfig) -> str:
    """Runs one job described by ``cfg`` (validated first); returns the MLflow run id.

    Raises :class:`ConfigError` (no run is created) for configuration mistakes; any other
    failure marks the run FAILED with the reason, keeps what was logged, and re-raises.
    """
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)

    job = job_info()
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    c: dict[str, Any] = OmegaConf.to_container(body, resolve=True)  # type: ignore[assignment]
    m = c["mlflow"]

    # Build first (torch work overlaps MLflow's import on the prefetch thread); a failure
    # here is still recorded: the run is created below and marked FAILED with it.
    built: _Built | None = None
    build_error: Exception | None = None
    try:
        built = _build(cfg, c)
    except Exception as e:
        build_error = e

    mlflow_ready()
    from mlflow.tracking import MlflowClient

    from sparsify_exp import tracking as tr

    uri = tr.resolve_tracking_uri(m["tracking_uri"], job.launch_dir)
    client = MlflowClient(tracking_uri=uri)
    exp_id = tr.ensure_experiment(client, m["experiment"])
    parent = None
    if job.multirun and job.sweep_dir is not None:
        parent = tr.parent_from_env(str(job.sweep_dir)) or tr.find_parent_by_sweep_dir(
            client, exp_id, str(job.sweep_dir)
        )

    run_name = m["run_name"] or (
        job.override_dirname
        if job.multirun and job.override_dirname
        else "-".join(v for v in (job.choices.get("sparsifier"), job.choices.get("data")) if v)
        or None
    )
    tags = {
        **{f"sparsify.choice.{k}": v for k, v in job.choices.items()},
        "sparsify.overrides": " ".join(job.overrides),
        "sparsify.job_dir": str(job.output_dir),
        "sparsify.evaluators": ",".join(c.get("eval") or {}),
        "mlflow.source.name": "python -m sparsify_exp",
        "mlflow.source.type": "LOCAL",
        **tr.git_info(Path(__file__).resolve().parent),
        **{str(k): str(v) for k, v in (m.get("tags") or {}).items()},
    }
    tracker = tr.RunTracker.start(client, exp_id, run_name, tags, parent_run_id=parent)
    log.info(
        "MLflow run %s (experiment %r, %s)%s",
        tracker.run_id,
        m["experiment"],
        uri,
        f", child of sweep run {parent}" if parent else "",
    )
    artifacts = job.output_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        if build_error is not None:
            raise build_error
        assert built is not None
        _execute(built, c, job, tracker, artifacts)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        try:
            (artifacts / "error.txt").write_text(traceback.format_exc())
            _log_artifacts(tracker, artifacts, job)
        except Exception as log_error:  # the store may be what failed
            log.warning("could not log the artifacts of the failed run: %s", log_error)
        tracker.fail(e, status)
        log.error("run %s %s: %s: %s", tracker.run_id, status, type(e).__name__, e)
        raise
    tracker.finish()
    return tracker.run_id


class _Progress:
    """tqdm on a terminal, a few plain log lines otherwise."""

    def __init__(self, mode: str, steps: int):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.steps, self.bar = mode, steps, None
        self.every = max(1, steps // 10)
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc="sparsify", unit="step")

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        sparsity = metrics.get("sparsity/overall", float("nan"))
        churn = metrics.get("churn/overall")
        if self.bar is not None:
            post = {"sparsity": f"{sparsity:.4f}"}
            if churn is not None:
                post["churn"] = f"{churn:.4f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif self.mode == "log" and (step % self.every == 0 or step == self.steps - 1):
            extra = f"  churn {churn:.4f}" if churn is not None else ""
            log.info("step %d/%d  sparsity %.4f%s", step + 1, self.steps, sparsity, extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _per_name_config(name: str, rules: list[Mapping]) -> tuple[bool, dict]:
    skip, conf = False, {}
    for rule in rules:
        if fnmatchcase(name, rule["pattern"]):
            skip = skip or bool(rule.get("skip"))
            conf.update(rule.get("config") or {})
    return skip, conf


def _hook(evaluators: Mapping[str, Any], hook: str, ctx: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, ev in evaluators.items():
        try:
            metrics = getattr(ev, hook)(ctx) or {}
        except Exception as e:
            raise RuntimeError(
                f"evaluator {name!r} failed in {hook}: {type(e).__name__}: {e}"
            ) from e
        for k, v in metrics.items():
            try:
                out[str(k)] = float(v)
            except (TypeError, ValueError) as e:
                raise RuntimeError(
                    f"evaluator {name!r} returned a non-numeric metric {k}={v!r} from {hook}"
                ) from e
    return out


@dataclass
class _Built:
    bundle: Any
    sparsifier: Any
    added: dict[str, Any]
    skipped: list[str]
    scheduler: Any
    evaluators: dict[str, Any]


def _build(cfg: DictConfig, c: dict[str, Any]) -> _Built:
    """Data, sparsifier (``add_data`` with the per-name config), scheduler, evaluators."""
    from hydra.utils import instantiate

    torch.manual_seed(int(c["seed"]))
    bundle = instantiate(cfg.data, _convert_="all")
    sp = instantiate(cfg.sparsifier, _convert_="all")
    rules = c["per_name"].get("rules") or []
    added: dict[str, Any] = {}
    skipped: list[str] = []
    for name, obj in bundle.named_data.items():
        skip, conf = _per_name_config(name, rules)
        if skip:
            skipped.append(name)
            continue
        sp.add_data(name, obj, **conf)
        added[name] = obj
    if not added:
        raise ValueError(
            f"per_name rules skip every name ({len(skipped)}); nothing left to sparsify"
        )
    sched_node = cfg.schedule.scheduler
    sched = (
        instantiate(sched_node, data_sparsifier=sp, _convert_="all")
        if sched_node is not None
        else None
    )
    evaluators = {
        name: instantiate(node, _convert_="all") for name, node in (cfg.get("eval") or {}).items()
    }
    return _Built(bundle, sp, added, skipped, sched, evaluators)


def _execute(built: _Built, c: dict[str, Any], job: JobInfo, tracker: Any, artifacts: Path) -> None:
    """Steps, logs and writes one built job; the artifacts are logged even when it fails."""
    from sparsify_exp import tracking as tr
    from sparsify_exp.data import as_tensor
    from sparsify_exp.evaluation import EvalContext

    m, steps = c["mlflow"], int(c["schedule"]["steps"])
    t0 = time.perf_counter()
    tracker.log_params(tr.flatten(c))
    cfg_dir = artifacts / "config"
    cfg_dir.mkdir(exist_ok=True)
    OmegaConf.save(c, cfg_dir / "config.yaml")
    (cfg_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(list(job.overrides)))

    try:
        bundle, sp, added, skipped, sched, evaluators = (
            built.bundle,
            built.sparsifier,
            built.added,
            built.skipped,
            built.scheduler,
            built.evaluators,
        )
        eval_dir = artifacts / "eval"
        eval_dir.mkdir(exist_ok=True)
        ctx = EvalContext(
            named_data=added, sparsifier=sp, model=bundle.model, artifacts_dir=eval_dir
        )
        names = list(added)
        numels = {n: as_tensor(added[n]).numel() for n in names}
        total = sum(numels.values())
        tracker.log_params(
            {"data.names": len(names), "data.numel": total, "data.names_skipped": len(skipped)}
        )
        log.info(
            "%d names (%d entries) to sparsify with %s, %d step(s)%s",
            len(names),
            total,
            type(sp).__name__,
            steps,
            f"; {len(skipped)} kept dense by per_name rules" if skipped else "",
        )
        if bundle.source:
            tracker.set_tags({"sparsify.data_source": bundle.source})

        # per-name keys only for the first max_name_metrics names (the dashboard stays usable)
        keyed = {
            n: tr.metric_key("sparsity", n if n not in SUMMARY_KEYS else f"{n}_")
            for n in names[: int(m["max_name_metrics"])]
        }
        tracker.log_metrics(_hook(evaluators, "on_start", ctx), step=0)

        param = getattr(sched, "schedule_param", None)
        churn = MaskChurn()
        track_churn = steps > 1
        progress = _Progress(c["output"]["progress"], steps)
        last: dict[str, float] = {}
        per_name_sparsity: dict[str, float] = {}
        try:
            for k in range(steps):
                scheduled = (
                    [float(sp.data_groups[n][param]) for n in names if param in sp.data_groups[n]]
                    if param
                    else []
                )
                sp.step()
                if sched is not None:
                    sched.step()
                metrics: dict[str, float] = {}
                zeros_total, changed = 0, 0
                per_name_sparsity = {}
                for n in names:
                    mask = sp.get_mask(n)
                    kept = int(mask.count_nonzero())
                    zeros_total += numels[n] - kept
                    per_name_sparsity[n] = (numels[n] - kept) / max(numels[n], 1)
                    if track_churn:
                        changed += churn.update(n, mask)
                    if n in keyed:
                        metrics[keyed[n]] = per_name_sparsity[n]
                values = list(per_name_sparsity.values())
                metrics["sparsity/overall"] = zeros_total / max(total, 1)
                metrics["sparsity/min"] = min(values)
                metrics["sparsity/mean"] = sum(values) / len(values)
                metrics["sparsity/max"] = max(values)
                if track_churn and k > 0:
                    metrics["churn/overall"] = changed / max(total, 1)
                if scheduled:
                    metrics[tr.metric_key("schedule", param)] = sum(scheduled) / len(scheduled)
                if k % int(m["log_every"]) == 0 or k == steps - 1:
                    tracker.log_metrics(metrics, step=k)
                if m["masks_every"] and (k + 1) % int(m["masks_every"]) == 0 and k < steps - 1:
                    tr.save_masks(sp, names, artifacts / "masks" / f"step_{k:06d}.safetensors")
                progress.update(k, metrics)
                last = metrics
        finally:
            progress.close()
        churn.clear()
        final = steps - 1
        tracker.log_metrics(_hook(evaluators, "on_masked", ctx), step=final)

        # ---- the masks: compact file, pictures, table
        tr.save_masks(sp, names, artifacts / "masks" / "final.safetensors")
        write_table(artifacts / "per_name.csv", bundle, added, skipped, per_name_sparsity)
        n_img = mask_images(
            sp, names, artifacts / "masks" / "png", int(m["mask_images"]), int(m["image_max_side"])
        )
        kept_counts = {n: int(sp.get_mask(n).count_nonzero()) for n in names}
        sp.squash_mask()

        # ---- the sparsified data, in the input's format, and what it costs on disk
        sizes = storage_sizes(bundle, added, kept_counts)
        if c["output"]["write_data"]:
            data_dir = artifacts / "data" if m["log_data"] else job.output_dir / "data"
            data_dir.mkdir(parents=True, exist_ok=True)
            path = bundle.save(data_dir / "sparsified")
            file_bytes = path.stat().st_size
            sizes["size/compressed_bytes"] += file_bytes - sizes["size/dense_bytes"]
            sizes["size/dense_bytes"] = file_bytes
            log.info("sparsified data written to %s", path)
        sizes["size/compression_ratio"] = sizes["size/dense_bytes"] / max(
            sizes["size/compressed_bytes"], 1
        )
        tracker.log_metrics(sizes, step=final)
        tracker.log_metrics(_hook(evaluators, "on_end", ctx), step=final)
        tracker.log_metrics({"time/run_s": time.perf_counter() - t0}, step=final)
        tracker.flush()
        log.info(
            "done: sparsity %.4f over %d names (min %.4f, max %.4f); %d mask image(s); "
            "%.1f MB dense -> %.1f MB as bitmask + kept values",
            last.get("sparsity/overall", math.nan),
            len(names),
            last.get("sparsity/min", math.nan),
            last.get("sparsity/max", math.nan),
            n_img,
            sizes["size/dense_bytes"] / 1e6,
            sizes["size/compressed_bytes"] / 1e6,
        )
    finally:
        _log_artifacts(tracker, artifacts, job)


def _log_artifacts(tracker: Any, artifacts: Path, job: JobInfo) -> None:
    """Uploads the job's artifacts folder and its log file (also for a failed run)."""
    tracker.flush()
    if artifacts.is_dir() and any(artifacts.iterdir()):
        tracker.log_artifact(artifacts)
    if job.log_file is not None and job.log_file.is_file():
        tracker.log_artifact(job.log_file, "logs")


# --------------------------------------------------------------------------- entry points


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # a worker must not exit; the launcher reports the job's error
        sys.stderr.write(e.report() + "\n")
        sys.stderr.flush()
        raise SystemExit(2) from None


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
    with initialize_config_module("sparsify_exp.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides or []), return_hydra_config=hydra_config)


def run_overrides(
    overrides: list[str] | None = None, output_dir: str | os.PathLike | None = None
) -> str:
    """Runs one job in-process (no sweep, no Hydra logging set-up); returns the MLflow run id.

    Handy in notebooks and tests: ``run_overrides(["sparsifier=first_row", "data=embeddings"])``.
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
