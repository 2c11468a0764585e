"""``report/tradeoff.html``: the sweep's trade-off as an interactive plotly page, for what the
MLflow UI's saved charts cannot draw: the pick's bounds as lines, the pick marked, one colour
a series (a method, a block shape), and parallel coordinates over every swept key, categorical
ones (a method) included. MLflow shows an HTML artifact in the run's artifact pane."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sparsify_exp.runner.sweep.summary import COMPRESSED_MB, SPARSITY, is_summary

SIZE_KEYS = ("_summary/size_mb", "_summary/size_to_dense", "_summary/quantized_mb")


def _label(key: str) -> str:
    return key.removeprefix("_summary/")


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:  # a declared dependency; an old environment may lack it
        import logging

        logging.getLogger("sparsify_exp.runner").warning(
            "report/tradeoff.html skipped: no plotly (pip install 'plotly>=5.20')"
        )
        return None
    return go, make_subplots


def write_tradeoff(
    frame: pd.DataFrame,
    varied: Mapping[str, Sequence[str]],
    series_keys: Sequence[str],
    pick: str,
    bounds: Mapping[str, Sequence[Any]],
    path: Path,
    title: str,
) -> bool:
    """Writes the page from ``frame`` (one row a finished child: ``name``, the varied keys,
    the ``_summary/`` metrics); ``varied`` maps each swept key to its values in row order.
    Returns False when there is nothing to draw (or no plotly)."""
    lib = _plotly()
    if lib is None or frame.empty or SPARSITY not in frame:
        return False
    go, make_subplots = lib
    quality = [k for k in frame if is_summary(k) and k != SPARSITY and k not in SIZE_KEYS]
    panels = [*quality, *([COMPRESSED_MB] if COMPRESSED_MB in frame else [])]
    if not panels:
        return False
    series = frame[list(series_keys)].astype(str).agg(" ".join, axis=1) if series_keys else None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=[f"{_label(k)} vs sparsity" for k in panels]
    )
    groups = list(frame.groupby(series, sort=False)) if series is not None else [("runs", frame)]
    for i, key in enumerate(panels):
        row, col = i // cols + 1, i % cols + 1
        for j, (name, group) in enumerate(groups):
            group = group.sort_values(SPARSITY)
            fig.add_trace(
                go.Scatter(
                    x=group[SPARSITY],
                    y=group[key],
                    mode="lines+markers",
                    name=str(name),
                    legendgroup=str(name),
                    showlegend=i == 0,
                    marker={"color": _colour(j), "size": 8},
                    line={"color": _colour(j)},
                    text=group["name"],
                    hovertemplate="%{text}<br>sparsity %{x:.1%}<br>" + _label(key) + " %{y:.4g}",
                ),
                row=row,
                col=col,
            )
        picked = frame[frame["name"] == pick]
        if not picked.empty:
            fig.add_trace(
                go.Scatter(
                    x=picked[SPARSITY],
                    y=picked[key],
                    mode="markers+text",
                    text=["pick"],
                    textposition="top center",
                    marker={"symbol": "star", "size": 18, "color": "gold", "line": {"width": 1}},
                    name=f"pick: {pick}",
                    legendgroup="pick",
                    showlegend=i == 0,
                ),
                row=row,
                col=col,
            )
        same = _coinciding(groups, key)
        if same:  # one line hides the other: say so on the panel
            fig.add_annotation(
                text=f"{same}: the same points",
                xref="x domain" if i == 0 else f"x{i + 1} domain",
                yref="y domain" if i == 0 else f"y{i + 1} domain",
                x=0.02,
                y=0.02,
                showarrow=False,
                font={"size": 11, "color": "#555"},
                xanchor="left",
            )
        if key in bounds:
            op, bound = bounds[key]
            fig.add_hline(
                y=float(bound),
                line_dash="dash",
                line_color="firebrick",
                annotation_text=f"bound: {'at least' if op == '>=' else 'at most'} {bound:g}",
                row=row,
                col=col,
            )
        fig.update_xaxes(title_text="sparsity reached", tickformat=".0%", row=row, col=col)
        fig.update_yaxes(title_text=_label(key), row=row, col=col)
    fig.update_layout(title=title, height=380 * rows + 120, legend_title_text="series")
    parallel = _parallel(go, frame, varied, [SPARSITY, *panels], pick)
    html = fig.to_html(full_html=False, include_plotlyjs=True)
    html += parallel.to_html(full_html=False, include_plotlyjs=False)
    path.write_text(
        f"<html><head><meta charset='utf-8'><title>{title}</title></head><body>{html}</body></html>"
    )
    return True


def _coinciding(groups: Sequence[tuple[Any, pd.DataFrame]], key: str) -> str:
    """``a = b`` for the first series whose points for ``key`` equal another's, else ""."""
    seen: dict[tuple, str] = {}
    for name, group in groups:
        pts = tuple(map(tuple, group[[SPARSITY, key]].dropna().round(9).values.tolist()))
        if pts and pts in seen:
            return f"{seen[pts]} = {name}"
        seen.setdefault(pts, str(name))
    return ""


def _colour(i: int) -> str:
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
    return palette[i % len(palette)]


def _parallel(
    go: Any, frame: pd.DataFrame, varied: Mapping[str, Sequence[str]], keys: Sequence[str], pick
) -> Any:
    """Parallel coordinates: a categorical swept key as numbered ticks with its values'
    names; the pick drawn in gold, the others in blue."""
    dims = []
    for key, values in varied.items():
        column = frame[key].astype(str)
        try:
            numbers = column.astype(float)
            dims.append({"label": key.rsplit(".", 1)[-1], "values": numbers})
        except ValueError:
            names = list(dict.fromkeys(values))
            codes = column.map({v: i for i, v in enumerate(names)})
            dims.append(
                {
                    "label": key.rsplit(".", 1)[-1],
                    "values": codes,
                    "tickvals": list(range(len(names))),
                    "ticktext": names,
                }
            )
    dims += [{"label": _label(k), "values": frame[k]} for k in keys if k in frame]
    is_pick = (frame["name"] == pick).astype(float)
    return go.Figure(
        go.Parcoords(
            line={
                "color": is_pick,
                "colorscale": [[0, "#1f77b4"], [1, "gold"]],
                "cmin": 0,
                "cmax": 1,
            },
            dimensions=dims,
        ),
        layout={
            "title": "Swept settings to sparsity, quality and size (the pick in gold)",
            "height": 480,
        },
    )
