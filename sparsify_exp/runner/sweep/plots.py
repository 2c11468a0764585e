"""The sweep report's pictures (matplotlib): quality and size against the sparsity reached, a
line a series (a method, a block shape), the pick's bounds drawn and the pick starred.

Honest pictures: series whose points coincide are drawn once with one label naming them all
(``data_norm [1,1] = magnitude``); a timing ratio's axis spans at least 0.75 to 1.25, so noise
around 1 does not look like a trend."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from sparsify_exp.runner.tracking.store import COMPRESSED_BYTES_KEY, DENSE_BYTES_KEY, SPARSITY_KEY

#: A :class:`~sparsify_exp.runner.sweep.report.SweepReport` (not imported: the report
#: imports this module).
SweepReport = Any

MAX_PANELS = 9
#: A timing ratio's axis spans at least this around 1 (sparse / dense).
TIMING_SPAN = (0.75, 1.25)


def _series(report: SweepReport) -> dict[str, pd.DataFrame]:
    """Plot lines: finished jobs with a sparsity, grouped by the non-level varied options."""
    t = report.table
    t = t[t[SPARSITY_KEY].notna() & t["status"].isin(["FINISHED", "RUNNING"])]
    labels = [
        ", ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in report.series_keys) or "all jobs"
        for _, row in t.iterrows()
    ]
    groups = t.groupby(pd.Series(labels, t.index, dtype=object), sort=False)
    return {str(label): g.sort_values(SPARSITY_KEY) for label, g in groups}


def _merge_coinciding(groups: dict[str, pd.DataFrame], key: str) -> dict[str, pd.DataFrame]:
    """Series with the same points for ``key`` as one, labelled ``a = b``."""
    merged: dict[str, pd.DataFrame] = {}
    seen: list[tuple[list, str]] = []
    for label, rows in groups.items():
        pts = rows[[SPARSITY_KEY, key]].dropna().round(9).values.tolist()
        twin = next((name for points, name in seen if points == pts and pts), None)
        if twin is None:
            seen.append((pts, label))
            merged[label] = rows
        else:
            new = f"{twin} = {label}"
            merged = {new if k == twin else k: v for k, v in merged.items()}
            seen = [(p, new if n == twin else n) for p, n in seen]
    return merged


@contextmanager
def _figure(path: Path, title: str, n_panels: int) -> Iterator[list]:
    """Up to 3 panels a row, a title, a legend entry a series below them; saved on exit."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    nrows, ncols = math.ceil(n_panels / 3), min(3, n_panels)
    size = (max(4.6 * ncols, 9.0), 3.6 * nrows + 0.9)  # wide enough for the legend
    fig, grid = plt.subplots(nrows, ncols, figsize=size, squeeze=False, layout="constrained")
    for ax in grid.flat[n_panels:]:
        ax.set_visible(False)
    try:
        yield list(grid.flat[:n_panels])
        fig.suptitle(title, fontsize=13)
        by_label: dict[str, object] = {}
        for ax in grid.flat[:n_panels]:  # every panel's series, each once
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                by_label.setdefault(label, handle)
        labels = [k for k in by_label if k != "all jobs"]
        if labels:
            style = {"ncol": min(len(labels), 3), "frameon": False, "fontsize": 9}
            handles = [by_label[k] for k in labels]
            fig.legend(handles, labels, loc="outside lower center", **style)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def _lines(ax, groups: dict[str, pd.DataFrame], key: str, ylabel: str, scale: float = 1) -> None:
    """A line a series, each its own colour and marker (coinciding series drawn once)."""
    from matplotlib import rcParams

    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(_merge_coinciding(groups, key).items()):
        pts = rows[[SPARSITY_KEY, key]].dropna()
        style = {"color": colors[i % len(colors)], "marker": "os^Dvp*"[i % 7], "zorder": 2 + i}
        if not pts.empty:
            ax.plot(pts[SPARSITY_KEY], pts[key] / scale, label=label, lw=1.8, ms=6, **style)
    ax.set_title(key, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("sparsity reached (fraction of entries zeroed)")
    ax.grid(True, alpha=0.3)


def _pick(ax, report: SweepReport, key: str, scale: float = 1) -> None:
    """A gold star on the picked run's point."""
    rows = report.table[report.table["run_name"] == report.pick] if report.pick else []
    if len(rows) and pd.notna(rows[key].iloc[0]):
        x, y = rows[SPARSITY_KEY].iloc[0], rows[key].iloc[0] / scale
        ax.plot([x], [y], marker="*", ms=18, color="gold", mec="black", zorder=20, ls="none",
                label=f"pick: {report.pick}")  # fmt: skip


def _bound(ax, report: SweepReport, key: str) -> None:
    """The pick's bound on this metric (``_summary/<evaluator>_<metric>``), a red dashed line."""
    name = key.removesuffix("/sparse").replace("/", "_")
    bound = report.pick_bounds.get(f"_summary/{name}")
    if bound:
        op, value = bound
        ax.axhline(float(value), color="firebrick", ls="--", lw=1.2, zorder=1,
                   label=f"bound: {'at least' if op == '>=' else 'at most'} {value:g}")  # fmt: skip
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, float(value)), max(hi, float(value)))


def _reference(ax, values: Iterable[float], label: str, loc: str = "best") -> None:
    """Dashed grey lines (a dense baseline), with their own legend inside the panel."""
    lines = [ax.axhline(value, color="grey", ls="--", lw=1) for value in values]
    if lines:
        ax.legend(handles=lines[:1], labels=[label], loc=loc, fontsize=8)


def plot_quality(report: SweepReport, path: Path) -> bool:
    """A panel a sparse-side quality metric (no deltas, dense baselines nor timings)."""
    keys = [k for k in report.quality_keys if not k.endswith(("/dense", "/delta"))]
    keys = [k for k in keys if "time" not in k.split("/")[-1]][:MAX_PANELS]
    groups = _series(report)
    if not keys or not groups:
        return False
    with _figure(path, "Quality against sparsity", len(keys)) as axes:
        for ax, key in zip(axes, keys, strict=True):
            _lines(ax, groups, key, key.split("/", 1)[-1].replace("/sparse", ""))
            _bound(ax, report, key)
            _pick(ax, report, key)
            dense = report.table.get(key.removesuffix("/sparse") + "/dense")
            if key.endswith("/sparse") and dense is not None and dense.notna().any():
                _reference(ax, [dense.dropna().mean()], "dense")
    return True


def plot_size(report: SweepReport, path: Path) -> bool:
    """Compressed size against sparsity, then a panel a timing ratio (sparse / dense)."""
    groups = {k: g[g[COMPRESSED_BYTES_KEY].notna()] for k, g in _series(report).items()}
    groups = {k: g for k, g in groups.items() if not g.empty}
    if not groups:
        return False
    timing = [k for k in report.quality_keys if "time" in k.split("/")[-1]][: MAX_PANELS - 1]
    rows = pd.concat(groups.values())
    scale, unit = (1e6, "MB") if rows[COMPRESSED_BYTES_KEY].max() > 1e6 else (1e3, "kB")
    title = "Size and speed against sparsity" if timing else "Size against sparsity"
    with _figure(path, title, 1 + len(timing)) as axes:
        _lines(axes[0], groups, COMPRESSED_BYTES_KEY, f"size on disk ({unit})", scale)
        _pick(axes[0], report, COMPRESSED_BYTES_KEY, scale)
        axes[0].set_title("compressed size of the sparsified data", fontsize=10)
        dense = sorted(set(rows[DENSE_BYTES_KEY].dropna()) - {0.0})
        _reference(axes[0], [d / scale for d in dense], "dense size", "upper right")
        axes[0].set_ylim(bottom=0)
        for ax, key in zip(axes[1:], timing, strict=True):
            _lines(ax, groups, key, "time sparse / dense (higher is slower)")
            _pick(ax, report, key)
            _timing_axis(ax)
    return True


def _timing_axis(ax) -> None:
    """A ratio's axis: 1 dashed; decades on a log scale; else at least :data:`TIMING_SPAN`."""
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo > 20:  # ratios spanning decades
        ax.set_yscale("log")
    else:  # noise around 1 stays flat
        ax.set_ylim(min(lo, TIMING_SPAN[0]), max(hi, TIMING_SPAN[1]))
