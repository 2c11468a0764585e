"""The experiment runner: ``python -m sparsify_exp [group=option ...] [key=value ...]``.

compose (Hydra) -> validate (all problems at once) -> build data, sparsifier (``add_data`` with
per-name config), schedule, evaluators -> for each step: ``step()``, schedule, log -> masks,
pictures, per-name table -> ``squash_mask()`` -> write the sparsified data -> finish.

Every job is one MLflow run; a multirun (``-m``) also gets a parent run, created with the
experiment by :class:`SweepCallback` before any launcher worker starts.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from sparsify_exp.config import ConfigError, format_value, validate

log = logging.getLogger("sparsify_exp.runner")

SUMMARY_KEYS = ("overall", "min", "mean", "max")


# --------------------------------------------------------------------------- job context


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
        sweep_dir=_abs(launch, hc.sweep.dir) if multirun else None,
        override_dirname=str(OmegaConf.select(hc, "job.override_dirname", default="") or ""),
        log_file=log_file,
    )


def _abs(base: Path, path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p


# --------------------------------------------------------------------------- MLflow prefetch

_PREFETCH: threading.Thread | None = None
_MLFLOW_IMPORTED = threading.Event()


def _prefetch() -> None:
    try:
        import mlflow
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except Exception:  # the main thread imports again and reports any real problem
        pass
    finally:
        _MLFLOW_IMPORTED.set()
    try:  # the mask pictures need these at the end of the run
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401
    except Exception:
        pass


def start_prefetch() -> None:
    """Imports MLflow (~2 s), then matplotlib, on a thread while Hydra composes, the data is
    built and the steps run."""
    global _PREFETCH
    if _PREFETCH is None and "mlflow.tracking" not in sys.modules:
        _PREFETCH = threading.Thread(target=_prefetch, name="sparsify-prefetch", daemon=True)
        _PREFETCH.start()


def _mlflow_ready() -> None:
    """Waits for MLflow's import: two threads importing it at once break its circular imports."""
    if _PREFETCH is not None:
        _MLFLOW_IMPORTED.wait()


def _prefetch_done() -> None:
    if _PREFETCH is not None:
        _PREFETCH.join()


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

    _mlflow_ready()
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
        prev: dict[str, torch.Tensor] = {}
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
                        cur = mask if mask.dtype == torch.bool else mask != 0
                        if n in prev:
                            changed += int((cur != prev[n]).count_nonzero())
                            prev[n].copy_(cur)
                        else:
                            prev[n] = cur.clone()
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
        prev.clear()
        final = steps - 1
        tracker.log_metrics(_hook(evaluators, "on_masked", ctx), step=final)

        # ---- the masks: compact file, pictures, table
        tr.save_masks(sp, names, artifacts / "masks" / "final.safetensors")
        _write_table(artifacts / "per_name.csv", bundle, added, skipped, per_name_sparsity)
        n_img = _mask_images(
            sp, names, artifacts / "masks" / "png", int(m["mask_images"]), int(m["image_max_side"])
        )
        kept_counts = {n: int(sp.get_mask(n).count_nonzero()) for n in names}
        sp.squash_mask()

        # ---- the sparsified data, in the input's format, and what it costs on disk
        sizes = _sizes(bundle, added, kept_counts)
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
    tracker.flush()
    if artifacts.is_dir() and any(artifacts.iterdir()):
        tracker.log_artifact(artifacts)
    if job.log_file is not None and job.log_file.is_file():
        tracker.log_artifact(job.log_file, "logs")


def _kind(obj: Any) -> str:
    from torch import nn

    if isinstance(obj, nn.EmbeddingBag):
        return "embedding_bag"
    if isinstance(obj, nn.Embedding):
        return "embedding"
    if isinstance(obj, nn.Parameter):
        return "parameter"
    return "tensor"


def _write_table(
    path: Path,
    bundle: Any,
    added: Mapping[str, Any],
    skipped: list[str],
    sparsity: Mapping[str, float],
) -> None:
    from sparsify_exp.data import as_tensor

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "kind", "shape", "numel", "dtype", "sparsified", "sparsity"])
        for name, obj in bundle.named_data.items():
            t = as_tensor(obj)
            w.writerow(
                [
                    name,
                    _kind(obj),
                    "x".join(str(s) for s in t.shape),
                    t.numel(),
                    str(t.dtype).removeprefix("torch."),
                    name in added,
                    f"{sparsity.get(name, 0.0):.6f}",
                ]
            )


def _sizes(bundle: Any, added: Mapping[str, Any], kept: Mapping[str, int]) -> dict[str, float]:
    """Bytes of every written tensor stored dense, and stored compactly: each sparsified tensor
    as a 1-bit-per-entry mask plus its kept values (the bitmask encoding), or dense where that
    is smaller (nearly dense data). See docs/runner.md."""
    from sparsify_exp.data import as_tensor
    from sparsify_exp.sparsifier.mask_bits import packed_nbytes

    dense = sum(t.numel() * t.element_size() for t in bundle.tensors().values())
    saved = 0
    for name, obj in added.items():
        t = as_tensor(obj)
        encoded = packed_nbytes(t.numel()) + kept[name] * t.element_size()
        saved += max(t.numel() * t.element_size() - encoded, 0)
    return {"size/dense_bytes": float(dense), "size/compressed_bytes": float(dense - saved)}


def _mask_images(sp: Any, names: list[str], out: Path, limit: int, max_side: int) -> int:
    """A PNG per 2-D mask (at most ``limit``): fraction kept, block-averaged when large."""
    two_d = [n for n in names if sp.get_mask(n).dim() == 2][:limit]
    if not two_d:
        return 0
    _prefetch_done()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sparsify_exp import tracking as tr

    out.mkdir(parents=True, exist_ok=True)
    for name in two_d:
        mask = sp.get_mask(name)
        rows, cols = mask.shape
        h, w = min(rows, max_side), min(cols, max_side)
        img = torch.nn.functional.adaptive_avg_pool2d(mask.float()[None, None], (h, w))[0, 0]
        sparsity = 1.0 - float(mask.count_nonzero()) / max(mask.numel(), 1)
        fig = Figure(figsize=(6.4, 4.8), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        im = ax.imshow(
            img.numpy(),
            cmap="gray",
            vmin=0.0,
            vmax=1.0,
            aspect="auto",
            interpolation="nearest",
            extent=(0, cols, rows, 0),
        )
        note = "" if (h, w) == (rows, cols) else f" (block-averaged to {h}x{w})"
        ax.set_title(f"{name}  {rows}x{cols}  sparsity {sparsity:.1%}{note}", fontsize=9)
        ax.set_xlabel("column")
        ax.set_ylabel("row")
        fig.colorbar(im, ax=ax, label="fraction kept (white = kept, black = zeroed)")
        fig.tight_layout()
        fig.savefig(out / f"{tr.metric_key(name).replace('/', '_')}.png")
    return len(two_d)


# --------------------------------------------------------------------------- sweeps


@dataclass
class _Sweep:
    uri: str
    run_id: str
    expected_jobs: int | None
    prev_env: str | None


_ACTIVE_SWEEP: _Sweep | None = None
_MULTIRUN_SEEN = False


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
        global _MULTIRUN_SEEN
        _MULTIRUN_SEEN = True
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
    _mlflow_ready()
    from mlflow.tracking import MlflowClient

    from sparsify_exp import tracking as tr

    launch = Path(config.hydra.runtime.cwd)
    uri = tr.resolve_tracking_uri(config.mlflow.tracking_uri, launch)
    client = MlflowClient(tracking_uri=uri)
    exp_id = tr.ensure_experiment(client, config.mlflow.experiment)
    sweep_dir = str(_abs(launch, config.hydra.sweep.dir))
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
    _ACTIVE_SWEEP = _Sweep(uri, run_id, len(jobs) if jobs is not None else None, prev)
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
    """Closes the active sweep's parent run and writes its report (idempotent)."""
    global _ACTIVE_SWEEP
    sweep, _ACTIVE_SWEEP = _ACTIVE_SWEEP, None
    if sweep is None:
        return
    _mlflow_ready()
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


def fast_exit(code: object = 0) -> None:
    """Exits like ``sys.exit(code)`` after the atexit handlers, skipping the interpreter's
    module teardown (about 1.3 s here once torch and MLflow are loaded: it frees nothing a
    finished process needs). Used by ``python -m sparsify_exp`` for single runs; a sweep exits
    normally (launcher workers are shut down by the threading machinery that teardown runs).
    Set ``SPARSIFY_EXP_NO_FAST_EXIT=1`` to always exit normally."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")
        status = 1
    if os.environ.get("SPARSIFY_EXP_NO_FAST_EXIT") or _MULTIRUN_SEEN:
        raise SystemExit(status)
    import atexit

    atexit._run_exitfuncs()  # logging.shutdown (flushes the job log), MLflow's own hooks
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def main() -> None:
    """``python -m sparsify_exp``: Hydra's command line."""
    aborted: BaseException | None = None
    try:
        _hydra_main()
    except BaseException as e:
        aborted = e
        raise
    finally:
        if _ACTIVE_SWEEP is not None:  # on_multirun_end is skipped when a job raised
            finish_sweep(aborted)


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
