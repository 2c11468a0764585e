"""Sweep reports: which level should I pick?

At the end of a multirun the runner calls :func:`write_sweep_report` on the sweep's parent
run; it reads the child runs back from the tracking store and logs to the parent, under
``report/``:

* ``sweep_report.csv`` / ``sweep_report.md`` -- one row a job: its overrides (the varied ones
  as columns too), the sparsity reached, each quality metric, dense and compressed size;
* ``quality_vs_sparsity.png`` -- one panel per quality metric, one line per value of the
  varied options other than the level (e.g. one per block shape);
* ``size_vs_sparsity.png`` -- compressed size (and the dense size, dashed) against sparsity.

The same report can be rebuilt from the store later, e.g. for a sweep that ran on a cluster::

    python -m sparsify_exp.report --experiment NAME [--parent RUN_ID] [--tracking-uri URI]

Which metrics are "quality": every metric whose first segment names an evaluator of the run
(tag ``sparsify.evaluators``) or a shipped one (``fidelity``, ``embedding_bag``, ``task``),
except per-name breakdowns -- a key that extends another logged key (``fidelity/rel_error/emb``
extends ``fidelity/rel_error``). The user's own measures come first in the table.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException

__all__ = ["SweepReport", "build_sweep_report", "main", "write_sweep_report"]

SPARSITY_KEY = "sparsity/overall"
DENSE_BYTES_KEY = "size/dense_bytes"
COMPRESSED_BYTES_KEY = "size/compressed_bytes"
EVALUATORS_TAG = "sparsify.evaluators"
SWEEP_TAG = "sparsify.sweep"
PARENT_TAG = "mlflow.parentRunId"
# where a run's command-line overrides may be found, most specific first
OVERRIDE_TAGS = ("sparsify.overrides", "hydra.overrides", "overrides")
ERROR_TAGS = ("sparsify.failure", "sparsify.error", "mlflow.note.content")
DEFAULT_EVALUATORS = ("fidelity", "embedding_bag", "task")
# varied keys that set the level: they become the x axis (sparsity reached), not a line
LEVEL_KEY_PATTERN = re.compile(
    r"(^|\.)(sparsity_level|level|target_sparsity)$|^schedule\.(.*\.)?(target|initial_value)$"
)
ARTIFACT_DIR = "report"
MAX_PANELS = 9


# ----------------------------------------------------------------------------- the table


@dataclass
class JobRow:
    run_id: str
    run_name: str
    status: str
    overrides: dict[str, str]
    sparsity: float | None
    quality: dict[str, float]
    dense_bytes: float | None
    compressed_bytes: float | None
    error: str = ""

    @property
    def compression(self) -> float | None:
        if self.dense_bytes and self.compressed_bytes:
            return self.dense_bytes / self.compressed_bytes
        return None


@dataclass
class SweepReport:
    parent_run_id: str
    rows: list[JobRow]
    varied_keys: list[str]
    common_overrides: dict[str, str]
    quality_keys: list[str]
    series_keys: list[str]
    files: list[Path] = field(default_factory=list)


def parse_overrides(value: str | None) -> dict[str, str]:
    """``{"key": "value"}`` from an overrides tag: a JSON/Python list, or space-separated."""
    if not value:
        return {}
    items: Sequence[str] | None = None
    text = value.strip()
    if text.startswith("["):
        for loads in (json.loads, ast.literal_eval):
            try:
                parsed = loads(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, list):
                items = [str(x) for x in parsed]
                break
    if items is None:
        items = _split_outside_brackets(text)
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            continue
        out[key.lstrip("+~")] = val
    return out


def _split_outside_brackets(text: str) -> list[str]:
    """Split on whitespace (or, failing that, commas) not inside brackets or quotes."""
    sep = " " if " " in text.strip() else ","
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _run_overrides(run: Run) -> dict[str, str]:
    for tag in OVERRIDE_TAGS:
        if tag in run.data.tags:
            return parse_overrides(run.data.tags[tag])
    return {}


def _evaluator_names(run: Run) -> tuple[str, ...]:
    """The run's evaluators (its tag), then the shipped ones (a tag may name config options)."""
    tag = run.data.tags.get(EVALUATORS_TAG, "")
    names = [n.strip() for n in tag.split(",") if n.strip()]
    return tuple(dict.fromkeys([*names, *DEFAULT_EVALUATORS]))


def quality_keys_of(metric_keys: Iterable[str], evaluators: Sequence[str]) -> list[str]:
    """The summary quality metrics: an evaluator's keys that extend no other logged key."""
    keys = set(metric_keys)
    out = []
    for key in keys:
        parts = key.split("/")
        if parts[0] not in evaluators:
            continue
        if any("/".join(parts[:i]) in keys for i in range(2, len(parts))):
            continue  # a per-name breakdown of a summary key
        out.append(key)
    # the user's own measures first, then the generic ones; within a metric: sparse, delta, dense
    generic = {"embedding_bag": 1, "fidelity": 2}
    side = {"sparse": 0, "delta": 1, "dense": 2}

    def order(key: str) -> tuple:
        parts = key.split("/")
        return (generic.get(parts[0], 0), parts[:-1], side.get(parts[-1], -1), parts[-1])

    return sorted(out, key=order)


def _sort_value(value: str) -> tuple:
    """Numbers by value, lists of numbers (block shapes) by their entries, the rest as text."""
    try:
        return (0, (float(value),), "")
    except ValueError:
        pass
    try:
        parsed = ast.literal_eval(value)
        if isinstance(parsed, (list, tuple)) and all(isinstance(x, (int, float)) for x in parsed):
            return (1, tuple(float(x) for x in parsed), "")
    except (ValueError, SyntaxError, TypeError):
        pass
    return (2, (), value)


def child_runs(client: mlflow.MlflowClient, parent_run_id: str) -> list[Run]:
    parent = client.get_run(parent_run_id)
    runs, token = [], None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def build_rows(runs: Sequence[Run]) -> SweepReport:
    overrides = [_run_overrides(r) for r in runs]
    all_keys = sorted({k for o in overrides for k in o})
    varied = [k for k in all_keys if len({o.get(k) for o in overrides}) > 1]
    common = {k: overrides[0][k] for k in all_keys if k not in varied} if runs else {}
    rows, quality = [], []
    for run, ov in zip(runs, overrides, strict=False):
        metrics = run.data.metrics
        evaluators = _evaluator_names(run)
        qkeys = quality_keys_of(metrics, evaluators)
        for key in qkeys:
            if key not in quality:
                quality.append(key)
        error = next((run.data.tags[t] for t in ERROR_TAGS if t in run.data.tags), "")
        rows.append(
            JobRow(
                run_id=run.info.run_id,
                run_name=run.info.run_name or "",
                status=run.info.status,
                overrides=ov,
                sparsity=metrics.get(SPARSITY_KEY),
                quality={k: metrics[k] for k in qkeys},
                dense_bytes=metrics.get(DENSE_BYTES_KEY),
                compressed_bytes=metrics.get(COMPRESSED_BYTES_KEY),
                error=error.strip().splitlines()[0][:200] if error.strip() else "",
            )
        )
    series = [k for k in varied if not LEVEL_KEY_PATTERN.search(k)]
    rows.sort(
        key=lambda r: (
            [_sort_value(r.overrides.get(k, "")) for k in series],
            [_sort_value(r.overrides.get(k, "")) for k in varied if k not in series],
            r.sparsity if r.sparsity is not None else math.inf,
            r.run_name,
        )
    )
    return SweepReport(
        parent_run_id="",
        rows=rows,
        varied_keys=varied,
        common_overrides=common,
        quality_keys=quality,
        series_keys=series,
    )


def _columns(report: SweepReport) -> list[str]:
    return [
        "run_id",
        "run_name",
        "status",
        "overrides",
        *report.varied_keys,
        SPARSITY_KEY,
        *report.quality_keys,
        DENSE_BYTES_KEY,
        COMPRESSED_BYTES_KEY,
        "size/compression",
        "error",
    ]


def _record(report: SweepReport, row: JobRow) -> dict[str, object]:
    rec: dict[str, object] = {
        "run_id": row.run_id,
        "run_name": row.run_name,
        "status": row.status,
        "overrides": " ".join(
            f"{k}={v}" for k, v in row.overrides.items() if k in report.varied_keys
        ),
        SPARSITY_KEY: row.sparsity,
        DENSE_BYTES_KEY: row.dense_bytes,
        COMPRESSED_BYTES_KEY: row.compressed_bytes,
        "size/compression": row.compression,
        "error": row.error,
    }
    for key in report.varied_keys:
        rec[key] = row.overrides.get(key, "")
    for key in report.quality_keys:
        rec[key] = row.quality.get(key)
    return rec


def write_csv(report: SweepReport, path: Path) -> None:
    cols = _columns(report)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        for row in report.rows:
            rec = _record(report, row)
            writer.writerow({k: ("" if rec[k] is None else rec[k]) for k in cols})


def _human_bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _constant_baselines(report: SweepReport) -> dict[str, float]:
    """``.../dense`` metrics with one value over the sweep: stated once, not in every row."""
    out = {}
    for key in report.quality_keys:
        if key.endswith("/dense"):
            values = {r.quality.get(key) for r in report.rows}
            if len(values) == 1 and None not in values:
                out[key] = values.pop()
    return out


def write_markdown(report: SweepReport, path: Path, title: str = "Sweep report") -> None:
    baselines = _constant_baselines(report)
    cols = [
        "run",
        "status",
        *report.varied_keys,
        SPARSITY_KEY,
        *[k for k in report.quality_keys if k not in baselines],
        DENSE_BYTES_KEY,
        COMPRESSED_BYTES_KEY,
        "size/compression",
    ]
    if any(r.error for r in report.rows):
        cols.append("error")
    lines = [f"# {title}", ""]
    lines.append(f"Parent run `{report.parent_run_id}`, {len(report.rows)} jobs.")
    if report.common_overrides:
        common = " ".join(f"{k}={v}" for k, v in report.common_overrides.items())
        lines.append(f"Common overrides: `{common}`.")
    if baselines:
        dense = ", ".join(f"`{k}` = {_fmt(v)}" for k, v in baselines.items())
        lines.append(f"Dense baseline (every job): {dense}.")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report.rows:
        rec = _record(report, row)
        rec["run"] = row.run_id[:8]
        cells = []
        for col in cols:
            if col in (DENSE_BYTES_KEY, COMPRESSED_BYTES_KEY):
                cells.append(_human_bytes(rec[col]))  # type: ignore[arg-type]
            elif col == "size/compression" and rec[col] is not None:
                cells.append(f"{rec[col]:.2f}x")
            else:
                cells.append(_fmt(rec[col]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------- the plots


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _series(report: SweepReport) -> dict[str, list[JobRow]]:
    """Plot lines: finished jobs with a sparsity, grouped by the non-level varied options."""
    groups: dict[str, list[JobRow]] = {}
    for row in report.rows:
        if row.sparsity is None or row.status not in ("FINISHED", "RUNNING"):
            continue
        label = ", ".join(f"{_short(k)}={row.overrides.get(k, '')}" for k in report.series_keys)
        groups.setdefault(label or "all jobs", []).append(row)
    for rows in groups.values():
        rows.sort(key=lambda r: r.sparsity)
    return groups


_MARKERS = "os^Dvp*"


def _style(i: int, colors: list[str]) -> dict:
    """Series i: its own colour and marker; earlier lines wider, so overlapping ones show."""
    return {
        "color": colors[i % len(colors)],
        "marker": _MARKERS[i % len(_MARKERS)],
        "lw": max(3.2 - 0.7 * i, 1.2),
        "ms": max(7.0 - 1.0 * i, 4.0),
        "zorder": 2 + i,
    }


def _plot_keys(report: SweepReport) -> list[str]:
    """The quality panels: sparse-side metrics, no deltas, dense baselines, nor timings."""
    keys = [
        k
        for k in report.quality_keys
        if not k.endswith(("/dense", "/delta")) and "time" not in k.split("/")[-1]
    ]
    return keys[:MAX_PANELS]


def _figure(n_panels: int):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ncols = min(3, max(n_panels, 1))
    nrows = math.ceil(max(n_panels, 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows + 0.9), squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n_panels])


def _finish(plt, fig, axes, groups, path: Path, title: str) -> None:
    handles, labels = [], []
    for h, lab in zip(*axes[0].get_legend_handles_labels(), strict=False):
        if lab in groups:  # one entry a series; the panels' own legends say "dense"
            handles.append(h)
            labels.append(lab)
    height = fig.get_figheight()
    fig.suptitle(title, fontsize=13, y=1 - 0.12 / height, va="top")
    bottom = 0.1 / height
    if labels and labels != ["all jobs"]:
        ncol = min(len(labels), 4)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=9)
        bottom = (0.15 + 0.25 * math.ceil(len(labels) / ncol)) / height
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.4 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sparsity_axis(ax) -> None:
    ax.set_xlabel("sparsity reached (fraction of entries zeroed)")
    ax.grid(True, alpha=0.3)


def plot_quality(report: SweepReport, path: Path) -> bool:
    keys = _plot_keys(report)
    groups = _series(report)
    if not keys or not groups:
        return False
    plt, fig, axes = _figure(len(keys))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes, keys, strict=False):
        for i, (label, rows) in enumerate(groups.items()):
            pts = [(r.sparsity, r.quality[key]) for r in rows if key in r.quality]
            if pts:
                xs, ys = zip(*pts, strict=False)
                ax.plot(xs, ys, label=label, **_style(i, colors))
        if key.endswith("/sparse"):  # the dense baseline the sparse value is judged against
            dense_key = key[: -len("/sparse")] + "/dense"
            dense = [r.quality[dense_key] for r in report.rows if dense_key in r.quality]
            if dense:
                ax.axhline(sum(dense) / len(dense), color="grey", ls="--", lw=1, label="dense")
                ax.legend(loc="best", fontsize=8, handles=[ax.get_lines()[-1]])
        ax.set_title(key, fontsize=10)
        ax.set_ylabel(key.split("/", 1)[-1].replace("/sparse", ""))
        _sparsity_axis(ax)
    _finish(plt, fig, axes, groups, path, "Quality against sparsity")
    return True


def plot_size(report: SweepReport, path: Path) -> bool:
    groups = _series(report)
    groups = {k: [r for r in v if r.compressed_bytes is not None] for k, v in groups.items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return False
    timing = [k for k in report.quality_keys if "time" in k.split("/")[-1]]
    plt, fig, axes = _figure(1 + len(timing[: MAX_PANELS - 1]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    allrows = [r for rows in groups.values() for r in rows]
    mib = 1024.0 * 1024.0
    big = max(r.compressed_bytes or 0 for r in allrows) > mib
    scale, unit = (mib, "MiB") if big else (1024.0, "KiB")
    ax = axes[0]
    for i, (label, rows) in enumerate(groups.items()):
        sizes = [r.compressed_bytes / scale for r in rows]
        ax.plot([r.sparsity for r in rows], sizes, label=label, **_style(i, colors))
    dense = sorted({r.dense_bytes for r in allrows if r.dense_bytes})
    for j, d in enumerate(dense):
        ax.axhline(d / scale, color="grey", ls="--", lw=1, label=None if j else "dense size")
    ax.set_title("compressed size of the sparsified data", fontsize=10)
    ax.set_ylabel(f"size on disk ({unit})")
    ax.set_ylim(bottom=0)
    _sparsity_axis(ax)
    if dense:
        ax.legend(handles=[ax.get_lines()[-1]], loc="upper right", fontsize=8)
    for ax, key in zip(axes[1:], timing, strict=False):
        for i, (label, rows) in enumerate(groups.items()):
            pts = [(r.sparsity, r.quality[key]) for r in rows if key in r.quality]
            if pts:
                xs, ys = zip(*pts, strict=False)
                ax.plot(xs, ys, label=label, **_style(i, colors))
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        lo, hi = ax.get_ylim()
        if lo > 0 and hi / lo > 20:  # ratios spanning decades: log scale
            ax.set_yscale("log")
        ax.set_title(key, fontsize=10)
        ax.set_ylabel("time sparse / dense")
        _sparsity_axis(ax)
    _finish(plt, fig, axes, groups, path, "Size (and speed) against sparsity")
    return True


# ----------------------------------------------------------------------------- entry points


def build_sweep_report(
    client: mlflow.MlflowClient, parent_run_id: str, out_dir: Path | str
) -> SweepReport:
    """Read the sweep's child runs and write the table and plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_rows(child_runs(client, parent_run_id))
    report.parent_run_id = parent_run_id
    parent = client.get_run(parent_run_id)
    experiment = client.get_experiment(parent.info.experiment_id).name
    title = f"Sweep report: experiment {experiment}"
    for name, writer in (
        ("sweep_report.csv", write_csv),
        ("sweep_report.md", lambda r, p: write_markdown(r, p, title)),
    ):
        writer(report, out / name)
        report.files.append(out / name)
    for name, plot in (
        ("quality_vs_sparsity.png", plot_quality),
        ("size_vs_sparsity.png", plot_size),
    ):
        if plot(report, out / name):
            report.files.append(out / name)
    return report


def write_sweep_report(
    client: mlflow.MlflowClient, parent_run_id: str, out_dir: Path | str | None = None
) -> SweepReport:
    """Build the sweep's report and log it to the parent run under ``report/``.

    ``out_dir`` keeps the files there too (by default they go to a temporary folder).
    """
    with tempfile.TemporaryDirectory(prefix="sweep_report_") as tmp:
        report = build_sweep_report(client, parent_run_id, out_dir or tmp)
        _log_report(client, report)
    return report


def _log_report(client: mlflow.MlflowClient, report: SweepReport) -> None:
    for path in report.files:
        client.log_artifact(report.parent_run_id, str(path), artifact_path=ARTIFACT_DIR)


def _sweep_parents(client: mlflow.MlflowClient, experiment_id: str) -> list[Run]:
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsify_exp.report",
        description="Rebuild a sweep's report (table + plots) from the MLflow store and log "
        "it to the sweep's parent run.",
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument(
        "--parent", help="the sweep's parent run id (default: the latest sweep in the experiment)"
    )
    parser.add_argument("--all", action="store_true", help="report every sweep in the experiment")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLflow's own resolution)"
    )
    parser.add_argument("--out", help="also keep the report files in this folder")
    parser.add_argument(
        "--no-log", action="store_true", help="only write --out; log nothing to the store"
    )
    args = parser.parse_args(argv)
    if args.no_log and not args.out:
        parser.error("--no-log needs --out")

    client = mlflow.MlflowClient(tracking_uri=args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"error: no experiment named {args.experiment!r}", file=sys.stderr)
        return 2
    if args.parent:
        parents = [args.parent]
    else:
        found = _sweep_parents(client, experiment.experiment_id)
        if not found:
            print(
                f"error: no sweep parent run (tag {SWEEP_TAG}=true) in {args.experiment!r}",
                file=sys.stderr,
            )
            return 2
        parents = [r.info.run_id for r in (found if args.all else found[:1])]
    for parent_id in parents:
        out = Path(args.out) / parent_id if args.out and len(parents) > 1 else args.out
        with tempfile.TemporaryDirectory(prefix="sweep_report_") as tmp:
            try:
                report = build_sweep_report(client, parent_id, out or tmp)
            except MlflowException as e:
                print(f"error: sweep {parent_id}: {e.message}", file=sys.stderr)
                return 2
            if not args.no_log:
                _log_report(client, report)
            where = out or f"parent run artifacts {ARTIFACT_DIR}/"
            print(f"sweep {parent_id}: {len(report.rows)} jobs -> {where}")
            print(Path(out or tmp, "sweep_report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
