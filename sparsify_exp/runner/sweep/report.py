"""Sweep reports: which level should I pick?

At the end of a multirun the runner logs to the sweep's parent run, under ``report/``, a table
of its jobs (``sweep_report.csv`` / ``.md``: the varied overrides, the sparsity reached, each
quality metric, dense and compressed size), ``quality_vs_sparsity.png`` (a panel a quality metric,
a line a value of the varied options other than the level, e.g. one per block shape) and
``size_vs_sparsity.png``. ``python -m sparsify_exp.report --experiment NAME`` rebuilds it later.

"Quality" metrics: those whose first segment names an evaluator of the runs (tag
``sparsify.evaluators``) or a shipped one, except per-name breakdowns -- a key extending another
logged key (``fidelity/rel_error/emb`` extends ``fidelity/rel_error``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sparsify_exp.runner.progress import human_bytes
from sparsify_exp.runner.tracking import store as tr
from sparsify_exp.runner.tracking.store import COMPRESSED_BYTES_KEY, DENSE_BYTES_KEY, SPARSITY_KEY

__all__ = ["SweepReport", "build_sweep_report", "main", "write_sweep_report"]

DEFAULT_EVALUATORS = ("fidelity", "embedding_bag", "task")
# varied keys that set the level: the x axis (through the sparsity reached), not a line
LEVEL_KEY_PATTERN = re.compile(
    r"(^|\.)(sparsity_level|level|target_sparsity)$|^schedule\.(.*\.)?(target|initial_value)$"
)
COMPRESSION_KEY = "size/compressed_to_dense"  # compressed / dense: lower is smaller
SIZE_KEYS = (DENSE_BYTES_KEY, COMPRESSED_BYTES_KEY, COMPRESSION_KEY)
ARTIFACT_DIR = "report"
TRADEOFF_FILE = "tradeoff.html"


@dataclass
class SweepReport:
    """A sweep's table (one row a job, in plot order, the CSV's columns) and its column groups."""

    parent_run_id: str
    title: str
    table: pd.DataFrame
    varied_keys: list[str]
    common_overrides: dict[str, str]
    quality_keys: list[str]
    series_keys: list[str]
    files: list[Path] = field(default_factory=list)
    pick: str = ""
    """The child the parent run picked (tag ``sparsify.pick``) and by which rule."""
    pick_rule: str = ""
    pick_note: str = ""
    common_args: list[str] = field(default_factory=list)
    """The overrides every job shares, as given (``~``, ``+`` kept)."""
    pick_bounds: dict[str, list] = field(default_factory=dict)
    """The rule's bounds: ``{metric: [">=" | "<=", bound]}`` (tag ``sparsify.pick_bounds``)."""


# ----------------------------------------------------------------------------- the table


def override_tokens(tag: object) -> list[str]:
    """The job's Hydra overrides as given (``~``, ``+`` kept) from tag ``sparsify.overrides``:
    joined by single spaces (a value holds spaces only inside brackets or quotes)."""
    text, items, depth, quote, start = tag if isinstance(tag, str) else "", [], 0, "", 0
    for i, ch in enumerate(text + " "):
        if quote or ch in "'\"":
            quote = "" if ch == quote else quote or ch
        elif ch in "[{(]})":
            depth += 1 if ch in "[{(" else -1
        elif ch == " " and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [item for item in items if item]


def parse_overrides(tag: object) -> dict[str, str]:
    """``{key: value}`` of :func:`override_tokens` (a deletion ``~key`` has no value)."""
    pairs = (item.partition("=") for item in override_tokens(tag))
    return {key.lstrip("+~"): value for key, sep, value in pairs if sep}


def pasteable(tokens: Iterable[str]) -> str:
    """Overrides as a shell takes them back: quoted where a shell would split or expand."""
    return " ".join(t if re.fullmatch(r"[\w.,=+~/:@%\-]+", t) else shlex.quote(t) for t in tokens)


def quality_keys_of(metric_keys: Iterable[str], evaluators: Sequence[str]) -> list[str]:
    """The summary quality metrics: the user's own first; within a metric sparse, delta, dense."""
    keys = set(metric_keys)

    def breakdown(key: str) -> bool:
        parts = key.split("/")
        return any("/".join(parts[:i]) in keys for i in range(2, len(parts)))

    generic, side = {"embedding_bag": 1, "fidelity": 2}, {"sparse": 0, "delta": 1, "dense": 2}

    def order(key: str) -> tuple:
        parts = key.split("/")
        return (generic.get(parts[0], 0), parts[:-1], side.get(parts[-1], -1), parts[-1])

    summary = (k for k in keys if k.split("/")[0] in evaluators and not breakdown(k))
    return sorted(summary, key=order)


def _sort_value(value: str) -> list:
    """Natural order: numbers inside a value (a level, a block shape) compare by value; a job
    without the option comes last."""
    parts = re.split(r"(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)", value.replace(" ", ""))
    return [not value, *(float(p) if i % 2 else p for i, p in enumerate(parts))]


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column of ``frame``, all missing when no run logged it."""
    return frame[name] if name in frame else pd.Series(math.nan, frame.index, dtype=object)


def build_table(children: pd.DataFrame, parent_run_id: str, title: str) -> SweepReport:
    """The report of child runs laid out as ``mlflow.search_runs`` lays them out; the varied
    options are the overrides whose value differs between the jobs."""
    overrides = [parse_overrides(t) for t in _column(children, f"tags.{tr.OVERRIDES_TAG}")]
    given = pd.DataFrame(overrides, index=children.index, dtype=object)
    varied = sorted(k for k in given if given[k].nunique(dropna=False) > 1)
    common = {k: overrides[0][k] for k in sorted(given) if k not in varied}
    tokens = (
        override_tokens(_column(children, f"tags.{tr.OVERRIDES_TAG}").iloc[0])
        if len(children)
        else []
    )
    common_args = [t for t in tokens if t.split("=", 1)[0].lstrip("+~") not in varied]
    series = [k for k in varied if not LEVEL_KEY_PATTERN.search(k)]
    tags = _column(children, f"tags.{tr.EVALUATORS_TAG}").dropna()
    evaluators = {name.strip() for tag in tags for name in tag.split(",")}
    logged = [c.removeprefix("metrics.") for c in children if c.startswith("metrics.")]
    quality = quality_keys_of(logged, [*evaluators, *DEFAULT_EVALUATORS])
    numbers = [SPARSITY_KEY, *quality, DENSE_BYTES_KEY, COMPRESSED_BYTES_KEY]
    metric = {k: _column(children, f"metrics.{k}").astype(float) for k in numbers}
    dense, packed = metric[DENSE_BYTES_KEY], metric[COMPRESSED_BYTES_KEY]
    errors = _column(children, f"tags.{tr.FAILURE_TAG}").fillna("")
    shown = [" ".join(f"{k}={v}" for k, v in o.items() if k in varied) for o in overrides]
    table = pd.DataFrame(
        {
            "run_id": children["run_id"],
            "run_name": _column(children, "tags.mlflow.runName").fillna(""),
            "status": children["status"],
            "overrides": shown,
            **{k: given[k].fillna("") for k in varied},
            **metric,
            COMPRESSION_KEY: packed.where(packed != 0) / dense.where(dense != 0),
            "error": [(e.strip().splitlines() or [""])[0][:200] for e in errors],
        },
        index=children.index,
    )
    ranks = series + [k for k in varied if k not in series]

    def rank(row: dict) -> tuple:
        level = math.inf if pd.isna(row[SPARSITY_KEY]) else row[SPARSITY_KEY]
        return [_sort_value(row[k]) for k in ranks], level, row["run_name"]

    table = pd.DataFrame(sorted(table.to_dict("records"), key=rank), columns=table.columns)
    report = SweepReport(parent_run_id, title, table, varied, common, quality, series)
    report.common_args = common_args
    return report


def _cell(column: str, value: object) -> str:
    """Sizes in decimal units (MB), the size ratio as ``0.531x`` (of dense), other numbers to
    4 digits."""
    if pd.isna(value):
        return ""
    if column in (DENSE_BYTES_KEY, COMPRESSED_BYTES_KEY):
        return human_bytes(value, digits=2)
    if column == COMPRESSION_KEY:
        return f"{value:.3g}x"
    return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")


def markdown(report: SweepReport) -> str:
    """The table to read: runs by name (the pick in bold), and a dense value shared by every
    job stated once above the table instead of in every row."""
    t = report.table
    baselines = {
        k: t[k].iloc[0]
        for k in report.quality_keys
        if k.endswith("/dense") and t[k].notna().all() and t[k].nunique() == 1
    }
    quality = [k for k in report.quality_keys if k not in baselines]
    cols = ["status", *report.varied_keys, SPARSITY_KEY, *quality, *SIZE_KEYS]
    cols += ["error"] if t["error"].any() else []
    runs = "Parent runs" if "," in report.parent_run_id else "Parent run"
    lines = [f"# {report.title}", "", f"{runs} `{report.parent_run_id}`, {len(t)} jobs."]
    if report.common_args:
        lines.append(f"Common overrides (paste them back): `{pasteable(report.common_args)}`.")
    if baselines:
        dense = ", ".join(f"`{k}` = {_cell(k, v)}" for k, v in baselines.items())
        lines.append(f"Dense baseline (every job): {dense}.")
    if report.pick:
        note = f" Note: {report.pick_note}." if report.pick_note else ""
        lines.append(f"Picked: **{report.pick}** ({report.pick_rule}).{note}")
    lines += ["", "| " + " | ".join(["run", *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for _, row in t.iterrows():
        name = str(row["run_name"] or row["run_id"][:8]).replace("|", "\\|")
        name = f"**{name}** (picked)" if report.pick and row["run_name"] == report.pick else name
        cells = [name, *(_cell(c, row[c]) for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


# ----------------------------------------------------------------------------- entry points


def build_sweep_report(
    client: MlflowClient, parent_run_id: str | Sequence[str], out_dir: Path | str
) -> SweepReport:
    """Read the sweep's child runs and write the table and plots into ``out_dir``; several
    parent run ids give one report of all their children (their own picks not marked)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [parent_run_id] if isinstance(parent_run_id, str) else list(parent_run_id)
    parent = client.get_run(ids[0])
    experiment = client.get_experiment(parent.info.experiment_id).name
    # through the client, not mlflow.search_runs: that one reads the global tracking URI
    children = _merged_children(client, ids)
    title = f"Sweep report: experiment {experiment}"
    if len(ids) > 1:
        title = f"Report of {len(ids)} sweeps: experiment {experiment}"
    report = build_table(children, ",".join(ids), title)
    if len(ids) == 1:
        report.pick = parent.data.tags.get("sparsify.pick", "")
        report.pick_rule = parent.data.tags.get("sparsify.pick_rule", "")
        report.pick_note = parent.data.tags.get("sparsify.pick_note", "")
        report.pick_bounds = json.loads(parent.data.tags.get("sparsify.pick_bounds") or "{}")
    report.table.to_csv(out / "sweep_report.csv", index=False)
    (out / "sweep_report.md").write_text(markdown(report))
    from sparsify_exp.runner.sweep.plots import plot_quality, plot_size

    plots = {"quality_vs_sparsity.png": plot_quality, "size_vs_sparsity.png": plot_size}
    report.files = [out / "sweep_report.csv", out / "sweep_report.md"]
    report.files += [out / name for name, plot in plots.items() if plot(report, out / name)]
    if _tradeoff(report, children, out / TRADEOFF_FILE):
        report.files.append(out / TRADEOFF_FILE)
    return report


def _merged_children(client: MlflowClient, parent_ids: Sequence[str]) -> pd.DataFrame:
    """The children of every sweep, in order; a run name another sweep also has gets its
    sweep's number (``s2: level=0.5``), so rows and legends stay apart."""
    frames = [tr.sweep_children_frame(client, p) for p in parent_ids]
    if len(frames) == 1:
        return frames[0]
    names = [set(_column(f, "tags.mlflow.runName").dropna()) for f in frames]
    for i, frame in enumerate(frames):
        others = set().union(*(n for j, n in enumerate(names) if j != i))
        if "tags.mlflow.runName" in frame:
            frame["tags.mlflow.runName"] = [
                f"s{i + 1}: {n}" if n in others else n for n in frame["tags.mlflow.runName"]
            ]
    return pd.concat(frames, ignore_index=True)


def _tradeoff(report: SweepReport, children: pd.DataFrame, path: Path) -> bool:
    """The interactive trade-off page (:mod:`.charts`) from the finished children's
    ``_summary/`` metrics and swept values."""
    from sparsify_exp.runner.sweep.charts import write_tradeoff

    overrides = [parse_overrides(t) for t in _column(children, f"tags.{tr.OVERRIDES_TAG}")]
    names = _column(children, "tags.mlflow.runName").fillna("")
    summary = [c for c in children if c.startswith("metrics._summary/")]
    rows = [
        {
            "name": names.iloc[i] or children["run_id"].iloc[i][:8],
            **{k: o.get(k, "") for k in report.varied_keys},
            **{c.removeprefix("metrics."): children[c].iloc[i] for c in summary},
        }
        for i, o in enumerate(overrides)
        if children["status"].iloc[i] == "FINISHED"
    ]
    frame = pd.DataFrame(rows)
    varied = {k: [str(v) for v in frame[k]] for k in report.varied_keys} if rows else {}
    return write_tradeoff(
        frame, varied, report.series_keys, report.pick, report.pick_bounds, path, report.title
    )


def write_sweep_report(
    client: MlflowClient, parent_run_id: str, out_dir: Path | str | None = None
) -> SweepReport:
    """Build the sweep's report and log it to the parent run under ``report/``; ``out_dir``
    keeps the files there too (by default they go to a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="sweep_report_") as tmp:
        report = build_sweep_report(client, parent_run_id, out_dir or tmp)
        for path in report.files:
            client.log_artifact(parent_run_id, str(path), artifact_path=ARTIFACT_DIR)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sparsify_exp.report``: 2, with one line, for an unknown experiment or run."""
    parser = argparse.ArgumentParser(
        prog="python -m sparsify_exp.report",
        description="Rebuild a sweep's report (table + plots) from the MLflow store and log "
        "it to the sweep's parent run.",
    )
    add = parser.add_argument
    add("--experiment", required=True, help="MLflow experiment name")
    add("--parent", help="the sweep's parent run id (default: the experiment's latest sweep)")
    add("--all", action="store_true", help="report every sweep in the experiment")
    add(
        "--merge",
        action="store_true",
        help="one report of the sweeps (--all, or --parent ID,ID,...), logged to the latest "
        f"one's {ARTIFACT_DIR}/merged/",
    )
    add("--tracking-uri", help="MLflow tracking URI (default: MLflow's own resolution)")
    add("--out", help="also keep the report files in this folder")
    add("--no-log", action="store_true", help="only write --out; log nothing to the store")
    args = parser.parse_args(argv)
    if args.no_log and not args.out:
        parser.error("--no-log needs --out")
    client = tr.open_client(args.tracking_uri)
    if client.get_experiment_by_name(args.experiment) is None:
        return _fail(f"no experiment named {args.experiment!r}")
    if args.parent:
        parents = args.parent.split(",")
    else:
        parents = [r.info.run_id for r in tr.find_sweeps(client, args.experiment)]
    parents = parents if args.all or args.parent else parents[:1]
    if not parents:
        return _fail(f"no sweep parent run (tag {tr.SWEEP_TAG}=true) in {args.experiment!r}")
    if args.merge:
        return _merge(client, parents, args.out, args.no_log)
    for parent_id in parents:
        out = Path(args.out) / parent_id if args.out and len(parents) > 1 else args.out
        try:  # --no-log comes with --out
            write = build_sweep_report if args.no_log else write_sweep_report
            report = write(client, parent_id, out)
        except MlflowException as e:
            return _fail(f"sweep {parent_id}: {e.message}")
        where = out or f"parent run artifacts {ARTIFACT_DIR}/"
        print(f"sweep {parent_id}: {len(report.table)} jobs -> {where}")
        print(markdown(report))
    return 0


def _merge(client: MlflowClient, parents: list[str], out: str | None, no_log: bool) -> int:
    """One report of several sweeps, logged to the latest sweep's ``report/merged/``."""
    with tempfile.TemporaryDirectory(prefix="sweep_report_") as tmp:
        try:
            report = build_sweep_report(client, parents, out or tmp)
            if not no_log:
                for path in report.files:
                    client.log_artifact(parents[0], str(path), f"{ARTIFACT_DIR}/merged")
        except MlflowException as e:
            return _fail(f"sweeps {', '.join(parents)}: {e.message}")
    where = out or f"parent run {parents[0]} artifacts {ARTIFACT_DIR}/merged/"
    print(f"{len(parents)} sweeps: {len(report.table)} jobs -> {where}")
    print(markdown(report))
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
