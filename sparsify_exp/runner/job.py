"""One job of the runner: validate -> create the MLflow run -> build -> step -> finalize.

build: data, sparsifier (``add_data`` with per-name config), schedule, evaluators;
step: ``sparsifier.step()``, ``scheduler.step()``, per-step metrics, for ``schedule.steps``;
finalize: masks, pictures, per-name table, ``squash_mask()``, the sparsified data and its size.

A config mistake raises :class:`ConfigError` before any run exists; any later failure marks
the run FAILED (KILLED for Ctrl-C) with the reason, uploads what it had, and re-raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sparsify_exp.atomic import atomic_write_text, remove_leftovers
from sparsify_exp.masks import save_masks
from sparsify_exp.runner import methods
from sparsify_exp.runner.artifacts import (
    compacted_rows,
    drop_data,
    embedding_tables,
    keep_mode,
    mask_images,
    quantized_bytes,
    storage_sizes,
    write_data,
    write_table,
)
from sparsify_exp.runner.build import Built, build
from sparsify_exp.runner.config import EVAL_EVERY, ConfigError, evaluator_nodes
from sparsify_exp.runner.context import JobInfo, claim_job_folder, job_info
from sparsify_exp.runner.progress import Progress, human_bytes, percent
from sparsify_exp.runner.signals import is_stop, sigterm_raises
from sparsify_exp.runner.step_metrics import StepMetrics
from sparsify_exp.runner.sweep.keep import link_logged_data
from sparsify_exp.runner.sweep.summary import Summarizer, SummarizingTracker, headline
from sparsify_exp.runner.sweep.views import run_page
from sparsify_exp.runner.tracking import heartbeat, reachability
from sparsify_exp.runner.tracking import store as tr
from sparsify_exp.runner.tracking.spool import SPOOL_DIR
from sparsify_exp.runner.tracking.sync import sync
from sparsify_exp.runner.tracking.tracker import SpoolTracker
from sparsify_exp.runner.tracking.uploader import RunEndedElsewhere
from sparsify_exp.runner.train import checkpoint, resume
from sparsify_exp.runner.train.loop import MaskedForward, TrainContext, remask
from sparsify_exp.runner.validate import validate
from sparsify_exp.sparsifier.row import RowSparsifier

log = logging.getLogger("sparsify_exp.runner")


def run(cfg: DictConfig) -> str:
    """Runs one job described by ``cfg``; returns the MLflow run id."""
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    job = job_info()
    c: dict[str, Any] = OmegaConf.to_container(  # type: ignore[assignment]
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )
    resumed = None
    if c.get("resume"):  # the stopped run's own config, job folder and MLflow run
        uri = tr.resolve_tracking_uri(c["mlflow"]["tracking_uri"], job.launch_dir)
        resumed = resume.locate(str(c["resume"]), uri)
        lock = claim_job_folder(resumed.job_dir, "resuming", f"resume={c['resume']}")
        c = {**resumed.config, "resume": c["resume"]}
        cfg = OmegaConf.create(c)
        job = dataclasses.replace(job, output_dir=resumed.job_dir)
    else:
        key = "hydra.sweep.dir" if job.multirun else "hydra.run.dir"
        lock = claim_job_folder(job.output_dir, "running", key)
    try:
        removed = remove_leftovers(job.output_dir)  # partial files of a killed process
        if removed:
            log.info("removed %d partial file(s) a stopped process left", len(removed))
        if resumed is not None:
            sync(resumed.job_dir, out=log.info)  # what the stopped process had not uploaded
        return _run(cfg, c, job, resumed)
    finally:
        lock.release()


def _run(cfg: DictConfig, c: dict[str, Any], job: JobInfo, resumed: Any) -> str:
    tracker = start_run(c, job, resume_run_id=resumed.run_id if resumed else None)
    artifacts = job.output_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        with sigterm_raises():
            if resumed is None:
                _log_config(tracker, c, job, artifacts)
            built = build(cfg, c["per_name"].get("rules") or [], int(c["seed"]))
            _execute(built, c, job, tracker, artifacts, resumed is not None)
    except RunEndedElsewhere as e:  # its sweep was stopped: nothing more goes into the run
        tracker.fail(e, e.status)
        raise
    except BaseException as e:
        status = "KILLED" if is_stop(e) else "FAILED"
        try:
            atomic_write_text(artifacts / "error.txt", traceback.format_exc())
            upload_artifacts(tracker, artifacts, job)
        except Exception as log_error:  # the store may be what failed
            log.warning("could not log the artifacts of the failed run: %s", log_error)
        tracker.fail(e, status)
        log.info("run %s %s", tracker.run_id, status)
        raise
    upload_artifacts(tracker, artifacts, job)
    tracker.finish()
    with contextlib.suppress(Exception):  # one copy on disk: the job folder's links to it
        link_logged_data(tracker.upstream.client, tracker.run_id, job.output_dir)
    with contextlib.suppress(Exception):  # the store may be away: the run is spooled
        ended = tracker.upstream.client.get_run(tracker.run_id)
        if job.multirun:  # short: the sweep's own last line has the link
            log.info("%s: %s", ended.info.run_name, headline(ended.data.metrics))
        else:
            page = run_page(tracker.uri, ended.info.experiment_id, tracker.run_id)
            log.info("run %s: %s", tracker.run_id, page)
    return tracker.run_id


def start_run(c: Mapping[str, Any], job: JobInfo, resume_run_id: str | None = None) -> SpoolTracker:
    """Creates the job's MLflow run (a child of its sweep's parent run, when in one), after
    marking FAILED the runs of the experiment whose heartbeat stopped; returns its tracker,
    which logs through a spool in the job folder (:mod:`~sparsify_exp.runner.tracking.spool`).

    Raises :class:`~.tracking.reachability.StoreUnreachable` ("tracking server <uri>
    unreachable: ...") within seconds when an HTTP store does not answer.
    """

    m = c["mlflow"]
    uri = tr.resolve_tracking_uri(m["tracking_uri"], job.launch_dir)
    heartbeat_s = float(m.get("heartbeat_s") or 30)
    reachability.configure_http(uri, float(m.get("request_timeout_s") or 10))
    reachability.quiet_store_loggers()  # an outage is said once, by the tracker
    timeout_s = min(5.0, float(m.get("request_timeout_s") or 10))
    if job.multirun:  # the sweep goes on: its next job waits out an outage
        reachability.wait_reachable(uri, float(m.get("flush_timeout_s", 60)), timeout_s)
    else:  # a single run says so at once
        reachability.check_reachable(uri, timeout_s)
    client = tr.open_client(uri)
    with reachability.unreachable_as_error(uri):
        exp_id = tr.ensure_experiment(client, m["experiment"])
        try:
            stale_s = float(m.get("heartbeat_stale_s") or 10 * heartbeat_s)
            heartbeat.reap_dead_runs(client, exp_id, stale_s)
        except Exception as e:  # never stops a job: the next start tries again
            log.warning("could not check for runs whose process died: %s", e)
        parent = None
        if job.multirun and job.sweep_dir is not None:
            parent = tr.parent_from_env(str(job.sweep_dir)) or tr.find_parent_by_sweep_dir(
                client, exp_id, str(job.sweep_dir)
            )
    default_name = "-".join(
        v for v in (job.choices.get("sparsifier"), job.choices.get("data")) if v
    )
    if job.multirun:
        swept = [k for k in os.environ.get(tr.SWEPT_ENV, "").split(",") if k]
        default_name = tr.swept_run_name(job.overrides, swept) or job.override_dirname
    tags = {
        **{  # method=none (no preset) says nothing: the sparsifier tag says it all
            f"{tr.CHOICE_TAG_PREFIX}{k}": v
            for k, v in job.choices.items()
            if (k, v) != (methods.GROUP, methods.NO_METHOD)
        },
        tr.OVERRIDES_TAG: " ".join(job.overrides),
        "sparsify.job_dir": str(job.output_dir),
        tr.EVALUATORS_TAG: ",".join(evaluator_nodes(c.get("eval"))),
        "mlflow.source.name": "python -m sparsify_exp",
        "mlflow.source.type": "LOCAL",
        **tr.git_info(Path(__file__).resolve().parent),
        **{str(k): str(v) for k, v in (m.get("tags") or {}).items()},
        heartbeat.HEARTBEAT_TAG: str(int(time.time())),
    }
    with reachability.unreachable_as_error(uri):
        if resume_run_id is None:
            upstream = tr.RunTracker.start(
                client, exp_id, m["run_name"] or default_name or None, tags, parent_run_id=parent
            )
        else:  # the same run goes on
            upstream = tr.RunTracker(client, resume_run_id)
            client.update_run(resume_run_id, status="RUNNING")
            for key in (tr.FAILURE_TAG, "mlflow.note.content"):
                with contextlib.suppress(Exception):
                    client.delete_tag(resume_run_id, key)
            upstream.set_tags({heartbeat.HEARTBEAT_TAG: str(int(time.time()))})
    resume.write_run_file(job.output_dir, upstream.run_id, uri)
    tracker = SpoolTracker(
        upstream,
        job.output_dir / SPOOL_DIR,
        uri=uri,
        experiment_id=exp_id,
        flush_timeout_s=float(m.get("flush_timeout_s", 60)),
        heartbeat_s=heartbeat_s,
    )
    log.info(
        "MLflow run %s (experiment %r, %s)%s",
        tracker.run_id,
        m["experiment"],
        uri,
        f", child of sweep run {parent}" if parent else "",
    )
    return tracker


def _log_config(tracker: tr.RunTracker, c: Mapping[str, Any], job: JobInfo, artifacts: Path):
    # a swept group (method=magnitude,nm_2_4) as a param too: the UI's charts axes are params
    swept = [k for k in os.environ.get(tr.SWEPT_ENV, "").split(",") if k in job.choices]
    tracker.log_params({**tr.flatten(c), **{g: str(job.choices[g]) for g in swept}})
    cfg_dir = artifacts / "config"
    cfg_dir.mkdir(exist_ok=True)
    atomic_write_text(cfg_dir / "config.yaml", OmegaConf.to_yaml(c))
    atomic_write_text(cfg_dir / "overrides.yaml", OmegaConf.to_yaml(list(job.overrides)))


def _hook(evaluators: Mapping[str, Any], hook: str, ctx: Any) -> dict[str, float]:
    """Calls ``hook`` on every evaluator; a failure or a non-number names the evaluator."""
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


def _train(built: Built, sp: Any, tracker: Any, step: int, steps: int) -> None:
    """Runs ``train.fn`` after schedule step ``step``; its metrics go under ``train/``."""

    def log_train(metrics: Mapping[str, float]) -> None:
        tracker.log_metrics({f"train/{k}": float(v) for k, v in metrics.items()}, step=step)

    ctx = TrainContext(built.bundle.model, built.added, sp, step, steps, log_train)
    try:
        metrics = built.train_fn(ctx) or {}
    except Exception as e:
        raise RuntimeError(f"train.fn failed at step {step}: {type(e).__name__}: {e}") from e
    remask(sp)
    log_train(metrics)


def _execute(
    built: Built,
    c: Mapping[str, Any],
    job: JobInfo,
    tracker: Any,
    artifacts: Path,
    resuming: bool = False,
) -> None:
    from sparsify_exp.runner.data import as_tensor
    from sparsify_exp.runner.evaluation import DenseReference, EvalContext

    t0 = time.perf_counter()
    m, steps = c["mlflow"], int(c["schedule"]["steps"])
    state = checkpoint.load(job.output_dir) if resuming else None
    if state is not None:
        tracker = resume.SkipLogged(tracker, resume.last_logged_steps(tracker))
    tracker = SummarizingTracker(tracker, Summarizer(built.evaluators.values()))
    sp, names = built.sparsifier, list(built.added)
    numels = {n: as_tensor(built.added[n]).numel() for n in names}
    tracker.log_params(
        {
            "data.names": len(names),
            "data.numel": sum(numels.values()),
            "data.names_skipped": len(built.skipped),
        }
    )
    if built.bundle.source:
        tracker.set_tags({"sparsify.data_source": built.bundle.source})
    if built.nonfinite:
        tracker.log_params({"data.nonfinite": sum(built.nonfinite.values())})
        tracker.set_tags(
            {"sparsify.nonfinite": ", ".join(f"{n}={c}" for n, c in built.nonfinite.items())[:5000]}
        )
    log.info(
        "%d names (%d entries) to sparsify with %s, %d step(s)%s",
        len(names),
        sum(numels.values()),
        type(sp).__name__,
        steps,
        f"; {len(built.skipped)} kept dense by per_name rules" if built.skipped else "",
    )
    eval_dir = artifacts / "eval"
    eval_dir.mkdir(exist_ok=True)
    ctx = EvalContext(
        named_data=built.added,
        sparsifier=sp,
        model=built.bundle.model,
        artifacts_dir=eval_dir,
        extras={"training": built.train_fn is not None},
        max_names=int(m["max_name_metrics"]),
        tokenizer=built.bundle.tokenizer,
    )
    wanting = [n for n, ev in built.evaluators.items() if getattr(ev, "wants_dense", False)]
    if wanting and state is None:  # a resumed run's data is no longer dense
        ctx.dense = DenseReference.capture(built.bundle.model, built.added)
        log.info("dense reference copied for %s", ", ".join(wanting))
    elif wanting:
        raise RuntimeError(
            f"{', '.join(wanting)} compare with the dense data, which a resumed run no longer has"
        )
    tracker.log_metrics({**built.calibration, **_hook(built.evaluators, "on_start", ctx)}, step=0)

    # ---- the steps
    measure = StepMetrics(
        names,
        numels,
        max_name_metrics=int(m["max_name_metrics"]),
        schedule_param=getattr(built.scheduler, "schedule_param", None),
        track_churn=steps > 1,
    )
    progress = Progress(c["output"]["progress"], steps)
    every = (c.get("eval") or {}).get(EVAL_EVERY)
    train_steps = int(c["train"]["steps_per_step"])
    checkpoint_every = int((c.get("checkpoint") or {}).get("every") or 0)
    mapped = built.bundle.mapped  # a read-only memory map: never written, not checkpointed
    last: dict[str, float] = {}
    try:
        with MaskedForward(built.bundle.model if built.train_fn else None, sp):
            start = 0
            if state is not None:
                model = built.bundle.model
                start = 1 + checkpoint.restore(state, sp, built.scheduler, model, bool(mapped))
                measure.prime(sp)
                log.info("resumed at step %d of %d from %s", start, steps, job.output_dir)
            for k in range(start, steps):
                scheduled = measure.scheduled_value(sp)
                sp.step()
                if built.scheduler is not None:
                    built.scheduler.step()
                if built.train_fn is not None:
                    _train(built, sp, tracker, k, train_steps)
                last = measure.measure(sp, scheduled)
                if every and (k + 1) % every == 0 and k < steps - 1:  # the last: on_masked
                    last.update(_hook(built.evaluators, "on_step", ctx))
                if k % int(m["log_every"]) == 0 or k == steps - 1:
                    tracker.log_metrics(last, step=k)
                if m["masks_every"] and (k + 1) % int(m["masks_every"]) == 0 and k < steps - 1:
                    save_masks(sp, names, artifacts / "masks" / f"step_{k:06d}.safetensors")
                if checkpoint_every and (k + 1) % checkpoint_every == 0 and k < steps - 1:
                    tracker.flush()  # the store has every step the checkpoint holds
                    model = built.bundle.model
                    checkpoint.save(job.output_dir, k, sp, built.scheduler, model, bool(mapped))
                progress.update(k, last)
    finally:
        progress.close()
        measure.close()
    final = steps - 1
    tracker.log_metrics(_hook(built.evaluators, "on_masked", ctx), step=final)

    # ---- the masks: compact file, pictures, table
    save_masks(sp, names, artifacts / "masks" / "final.safetensors")
    write_table(
        artifacts / "per_name.csv", built.bundle, built.added, measure.per_name, ctx.per_name
    )
    n_img = mask_images(
        sp, names, artifacts / "masks" / "png", int(m["mask_images"]), int(m["image_max_side"])
    )
    kept = {n: int(sp.get_mask(n).count_nonzero()) for n in names}
    rows = compacted_rows(sp, names) if isinstance(sp, RowSparsifier) and mapped is None else {}
    if mapped is not None:
        mapped.check_unchanged()  # masks of a file that changed mid-run would be wrong
    out_format = c["output"].get("format", "dense")
    if out_format != "dense" and mapped is not None:
        raise RuntimeError(
            f"output.format={out_format}: memory-mapped data is written dense "
            "(use output.format=dense, or data.mmap=false when the data fits in memory)"
        )
    final_masks = {n: sp.get_mask(n).detach() for n in names} if out_format != "dense" else {}
    sp.squash_mask(leave_parametrized=mapped is None)
    tables = embedding_tables(built.bundle) if c["output"].get("quantize") else {}
    if c["output"].get("quantize") and not tables:
        raise RuntimeError("output.quantize=true: the data has no embedding tables")

    # ---- the sparsified data, in the input's format, and what it costs on disk
    sizes = storage_sizes(built.bundle, built.added, kept)
    if tables:
        sizes["size/quantized_bytes"] = quantized_bytes(built.bundle, tables, kept)
    keep = keep_mode(c["output"]["write_data"], job.multirun)
    if keep != "no":
        logged = m["log_data"] and keep == "yes"
        data_dir = artifacts / "data" if logged else job.output_dir / "data"
        path = write_data(built.bundle, sp, final_masks, out_format, data_dir, sizes)
        if keep == "measure":
            drop_data(path)
        elif logged:
            log.info("it is also logged as the run's artifact data/")
    sizes["size/compressed_to_dense"] = sizes["size/compressed_bytes"] / max(
        sizes["size/dense_bytes"], 1
    )
    sizes.update(rows)
    tracker.log_metrics(sizes, step=final)
    tracker.log_metrics(_hook(built.evaluators, "on_end", ctx), step=final)
    tracker.log_metrics({"time/run_s": time.perf_counter() - t0}, step=final)
    zeroed = sum(numels[n] - kept[n] for n in names)
    total = sum(numels.values())
    log.info(
        "done: %s of %s entries zeroed (%s) over %d names (per name %s to %s); "
        "%d mask image(s); %s dense -> %s as bitmask + kept values",
        f"{zeroed:,}",
        f"{total:,}",
        percent(zeroed / max(total, 1)),
        len(names),
        percent(last.get("sparsity/min", math.nan)),
        percent(last.get("sparsity/max", math.nan)),
        n_img,
        human_bytes(sizes["size/dense_bytes"]),
        human_bytes(sizes["size/compressed_bytes"]),
    )


def upload_artifacts(tracker: tr.RunTracker, artifacts: Path, job: JobInfo) -> None:
    """Uploads the job's artifacts folder and its log file (also for a failed run)."""
    tracker.flush()
    if artifacts.is_dir() and any(artifacts.iterdir()):
        tracker.log_artifact(artifacts)
    if job.log_file is not None and job.log_file.is_file():
        tracker.log_artifact(job.log_file, "logs")
