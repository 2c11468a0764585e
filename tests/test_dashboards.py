"""What MLflow's UI shows of a sweep, checked through MLflow's client (no browser): short
distinct names, ``_summary/`` keys on every run and on the parent, per-name keys capped, the
parent's pick and the saved runs-table view. ``scripts/screens.sh`` shows the same pages."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest
from mlflow.entities import Metric

from sparsify_exp.runner.cli import compose_config
from sparsify_exp.runner.sweep.pick import describe, pick_child
from sparsify_exp.runner.sweep.summary import Summarizer
from sparsify_exp.runner.sweep.views import VIEW_TAG_PREFIX, column
from sparsify_exp.runner.tracking.store import find_sweep_runs, find_sweeps

SUMMARY = (
    "_summary/sparsity",
    "_summary/size_mb",
    "_summary/size_to_dense",
    "_summary/fidelity_rel_error",
)


def _per_name_families(keys) -> dict[str, list[str]]:
    """``family -> keys`` of the per-name keys (``sparsity/<name>``, ``fidelity/<m>/<name>``)."""
    families: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split("/")
        if parts[0] == "sparsity" and parts[1] not in ("overall", "min", "mean", "max"):
            families.setdefault("sparsity", []).append(key)
        elif parts[0] in ("fidelity", "embedding_bag") and len(parts) == 3:
            families.setdefault("/".join(parts[:2]), []).append(key)
    return families


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, migrated_db):
    """A 4-job sweep over level x block shape on three embedding tables, per-name keys
    capped at 2, and a fidelity bound that rules out the highest level."""
    import shutil

    from conftest import run_cli
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("sweep")
    shutil.copy(migrated_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    proc = run_cli(
        [
            "-m",
            "sparsifier=data_norm",
            "data=embeddings",
            "eval=[fidelity,embedding_bag]",
            "eval.embedding_bag.timing_repeats=0",
            "sparsifier.sparsity_level=0.3,0.9",
            "sparsifier.sparse_block_shape=[1,1],[1,4]",
            "mlflow.max_name_metrics=2",
            "mlflow.mask_images=0",
            "sweep.pick.max={_summary/fidelity_rel_error: 0.6}",
            "sweep.pick.min={}",
            f"mlflow.tracking_uri={uri}",
        ],
        cwd=folder,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    (parent,) = find_sweeps(client, "sparsify_exp")
    parent, children = find_sweep_runs(client, parent.info.run_id)
    return proc, client, parent, children


def test_children_are_named_by_what_the_sweep_varies(sweep):
    _, _, parent, children = sweep
    names = sorted(c.info.run_name for c in children)
    assert names == [
        "level=0.3 block=1x1",
        "level=0.3 block=1x4",
        "level=0.9 block=1x1",
        "level=0.9 block=1x4",
    ]
    assert parent.info.run_name == (
        "sweep data_norm on embeddings: level 0.3,0.9 x block [1,1],[1,4]"
    )


def test_every_child_has_the_summary_keys_and_capped_per_name_keys(sweep):
    _, _client, _, children = sweep
    for child in children:
        metrics = child.data.metrics
        for key in (*SUMMARY, "_summary/embedding_bag_cosine_mean"):
            assert key in metrics, (child.info.run_name, key)
        assert metrics["_summary/sparsity"] == pytest.approx(metrics["sparsity/overall"], rel=1e-5)
        assert metrics["_summary/size_mb"] == pytest.approx(
            metrics["size/compressed_bytes"] / 1e6, rel=1e-5
        )
        assert metrics["_summary/size_to_dense"] == pytest.approx(
            metrics["size/compressed_bytes"] / metrics["size/dense_bytes"], rel=1e-5
        )
        assert metrics["_summary/fidelity_rel_error"] == pytest.approx(
            metrics["fidelity/rel_error"], rel=1e-5
        )
        families = _per_name_families(metrics)
        assert set(families) == {
            "sparsity",
            "fidelity/rel_error",
            "fidelity/energy_kept",
            "embedding_bag/cosine_mean",
            "embedding_bag/cosine_p05",
        }
        for family, keys in families.items():
            assert len(keys) == 2, (family, keys)  # three tables, capped at 2


def test_the_per_name_table_has_every_name_under_the_metric_names(sweep):
    _, client, _, children = sweep
    child = children[0]
    path = client.download_artifacts(child.info.run_id, "per_name.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3  # every name, not the capped two
    for column_name in ("sparsity", "fidelity/rel_error", "embedding_bag/cosine_mean"):
        assert all(row[column_name] != "" for row in rows), column_name
    for row in rows:
        key = f"fidelity/rel_error/{row['name']}"
        if key in child.data.metrics:
            assert float(row["fidelity/rel_error"]) == pytest.approx(
                child.data.metrics[key], rel=1e-4
            )


def test_the_parent_answers_the_sweep(sweep):
    proc, client, parent, children = sweep
    allowed = [c for c in children if c.data.metrics["_summary/fidelity_rel_error"] <= 0.6]
    best = max(allowed, key=lambda c: c.data.metrics["_summary/sparsity"])
    assert best.data.metrics["_summary/sparsity"] < max(
        c.data.metrics["_summary/sparsity"] for c in children
    )  # the bound mattered
    tags = parent.data.tags
    assert tags["sparsify.pick"] == best.info.run_name
    assert tags["sparsify.pick_run_id"] == best.info.run_id
    assert tags["sparsify.pick_rule"].startswith(
        "highest _summary/sparsity with _summary/fidelity_rel_error <= 0.6"
    )
    assert f"Pick: {best.info.run_name}" in tags["mlflow.note.content"]
    for key in SUMMARY:
        assert parent.data.metrics[key] == best.data.metrics[key], key
    assert parent.data.params["sweep.sparsifier.sparsity_level"] == "0.3,0.9"
    assert parent.data.params["sweep.sparsifier.sparse_block_shape"] == "[1,1],[1,4]"
    # the last line names the pick and the sweep's view in the classic runs view
    last = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-1]
    assert f"picked {best.info.run_name} (sparsity " in last
    page = f"#/experiments/{parent.info.experiment_id}/runs?viewStateShareKey="
    assert "the trade-off: mlflow ui --backend-store-uri sqlite:///" in last
    assert f"{page}{parent.info.run_id}&workflowType=machine_learning" in last
    # the report names the runs and marks the pick
    report = Path(client.download_artifacts(parent.info.run_id, "report/sweep_report.md"))
    text = report.read_text()
    assert f"Picked: **{best.info.run_name}** (highest _summary/sparsity" in text
    assert f"| **{best.info.run_name}** (picked) | FINISHED |" in text
    for child in children:
        assert f"| {child.info.run_name} |" in text or child is best


def test_each_job_ends_with_one_short_line_and_no_heartbeat(sweep):
    proc, _, parent, children = sweep
    assert "sparsify.heartbeat" not in parent.data.tags
    lines = (proc.stdout + proc.stderr).splitlines()
    for child in children:
        (line,) = [x for x in lines if f"] - {child.info.run_name}: sparsity " in x]
        tail = line.split("] - ", 1)[1]
        assert len(tail) < 140, tail
        assert "fidelity_rel_error" in tail and " MB (" in tail and "x dense)" in tail
        assert "sparsify.heartbeat" not in child.data.tags
    assert not any("# then http" in x for x in lines[:-1])  # only the sweep's last line links


def test_the_view_shows_the_trade_off_with_the_pick_marked(sweep):
    _, client, parent, children = sweep
    experiment = client.get_experiment(parent.info.experiment_id)
    state = json.loads(json.loads(experiment.tags[VIEW_TAG_PREFIX + parent.info.run_id])["state"])
    cols = state["selectedColumns"]
    swept = ["sparsifier.sparsity_level", "sparsifier.sparse_block_shape"]
    assert cols[0] == column("tags", "sparsify.picked")
    quality = ["_summary/embedding_bag_cosine_mean", "_summary/fidelity_rel_error"]
    size = ["_summary/size_mb", "_summary/size_to_dense"]
    numbers = [column("metrics", k) for k in [*quality, "_summary/sparsity", *size]]
    assert cols[1:6] == numbers
    assert cols[6:] == [column("params", k) for k in swept]
    # the first screen at 1800 px: ~1200 px after the name and start-time columns
    assert sum(state["columnWidths"][c] for c in cols[:6]) <= 1200
    assert column("attributes", "Duration") not in cols
    for col in cols:  # every header whole: ~7 px a character
        label = col.split(".", 1)[1].strip("`")
        assert state["columnWidths"][col] >= 7 * len(label) + 24, col
    picked = [c for c in children if c.data.tags.get("sparsify.picked")]
    assert [c.info.run_id for c in picked] == [parent.data.tags["sparsify.pick_run_id"]]
    charts = state["compareRunCharts"]
    (section,) = state["compareRunSections"]
    assert section["name"] == "Trade-off" and section["display"]
    scatters = [c for c in charts if c["type"] == "SCATTER"]
    assert [c["yaxis"]["key"] for c in scatters] == [*quality, "_summary/size_mb"]
    assert {c["xaxis"]["key"] for c in scatters} == {"_summary/sparsity"}
    (parallel,) = [c for c in charts if c["type"] == "PARALLEL"]
    assert parallel["selectedParams"] == swept
    assert parallel["selectedMetrics"][:3] == ["_summary/sparsity", *quality]
    assert all(c["metricSectionId"] == section["uuid"] for c in charts)
    assert "compareRunsMode=CHART" in parent.data.tags["mlflow.note.content"]


def test_the_trade_off_page_draws_the_bound_and_the_pick(sweep):
    _, client, parent, _ = sweep
    path = Path(client.download_artifacts(parent.info.run_id, "report/tradeoff.html"))
    html = path.read_text()
    assert "bound: at most 0.6" in html
    assert f"pick: {parent.data.tags['sparsify.pick']}" in html
    assert "fidelity_rel_error vs sparsity" in html and "parcoords" in html
    assert "[1,1] = [1,4]: the same points" in html  # both block shapes: the same sizes
    assert json.loads(parent.data.tags["sparsify.pick_bounds"]) == {
        "_summary/fidelity_rel_error": ["<=", 0.6]
    }


def test_the_report_overrides_paste_back(sweep):
    _, client, parent, _ = sweep
    text = Path(client.download_artifacts(parent.info.run_id, "report/sweep_report.md")).read_text()
    line = next(x for x in text.splitlines() if x.startswith("Common overrides"))
    pasted = shlex.split(line.split("`")[1])
    assert "eval=[fidelity,embedding_bag]" in pasted
    cfg = compose_config([o for o in pasted if not o.startswith("mlflow.tracking_uri")])
    assert dict(cfg.sweep.pick.max) == {"_summary/fidelity_rel_error": 0.6}
    assert dict(cfg.sweep.pick.min) == {}
    assert list(cfg.eval) == ["fidelity", "embedding_bag"]


def test_the_sweep_saves_a_runs_table_view_of_its_children(sweep):
    _, client, parent, children = sweep
    experiment = client.get_experiment(parent.info.experiment_id)
    envelope = json.loads(experiment.tags[VIEW_TAG_PREFIX + parent.info.run_id])
    assert envelope["name"] == parent.info.run_name
    state = json.loads(envelope["state"])
    found = client.search_runs([parent.info.experiment_id], state["searchFilter"])
    assert {r.info.run_id for r in found} == {c.info.run_id for c in children}
    assert state["orderByKey"] == column("metrics", "_summary/sparsity")
    for key in SUMMARY:
        assert column("metrics", key) in state["selectedColumns"]
    assert column("params", "sparsifier.sparsity_level") in state["selectedColumns"]
    assert re.search(r"viewStateShareKey=\w+", parent.data.tags["mlflow.note.content"])


# ------------------------------------------------------------------------------ the pick rule


def _runs(store, values: list[dict[str, float]], statuses=None) -> list:
    """Real runs in ``store`` with these last metric values, in start order."""
    client = store.client
    exp = client.create_experiment("pick")
    runs = []
    for i, metrics in enumerate(values):
        run = client.create_run(exp, run_name=f"r{i}")
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        client.set_terminated(run.info.run_id, (statuses or {}).get(i, "FINISHED"))
        runs.append(client.get_run(run.info.run_id))
    return runs


def test_pick_takes_the_highest_metric_within_the_bounds(store):
    runs = _runs(
        store,
        [
            {"_summary/sparsity": 0.2, "_summary/fidelity_rel_error": 0.1},
            {"_summary/sparsity": 0.5, "_summary/fidelity_rel_error": 0.3},
            {"_summary/sparsity": 0.8, "_summary/fidelity_rel_error": 0.7},
            {"_summary/sparsity": 0.6},  # no quality logged: does not meet the bound
        ],
        statuses={},
    )
    spec = {"metric": "_summary/sparsity", "max": {"_summary/fidelity_rel_error": 0.5}}
    pick = pick_child(runs, spec)
    assert pick.name == "r1"
    assert (pick.eligible, pick.candidates) == (2, 4)
    assert describe(pick, ["_summary/sparsity", "_summary/fidelity_rel_error"]) == (
        "r1 (sparsity 50.0%, fidelity_rel_error 0.3)"
    )


def test_pick_leaves_out_bounds_no_child_logged_and_skips_unfinished_runs(store):
    runs = _runs(
        store,
        [{"_summary/sparsity": 0.9}, {"_summary/sparsity": 0.4}, {"_summary/sparsity": 0.4}],
        statuses={0: "FAILED"},
    )
    pick = pick_child(runs, {"min": {"_summary/task_accuracy_delta": -0.01}})
    assert pick.name == "r1"  # the failed r0 is out; a tie goes to the first started
    assert pick.unused_bounds == ["_summary/task_accuracy_delta >= -0.01"]
    assert pick.rule == "highest _summary/sparsity"


def test_pick_says_when_no_child_meets_the_rule(store):
    runs = _runs(store, [{"_summary/sparsity": 0.9, "_summary/fidelity_rel_error": 0.9}])
    pick = pick_child(runs, {"mode": "min", "max": {"_summary/fidelity_rel_error": 0.5}})
    assert pick.run is None
    assert describe(pick, []) == (
        "nothing: no finished child meets the rule "
        "(lowest _summary/sparsity with _summary/fidelity_rel_error <= 0.5)"
    )


def test_summary_keys_come_first_and_read_in_human_units():
    class Task:
        name = "task"

        def summary(self, metrics):
            from sparsify_exp.runner.evaluation import TaskEvaluator

            return TaskEvaluator.summary(self, metrics)

    out = Summarizer([Task()])(
        {
            "sparsity/emb": 0.5,
            "sparsity/overall": 0.123456789,
            "size/compressed_bytes": 2_500_000.0,
            "size/compressed_to_dense": 0.25,
            "task/accuracy/sparse": 0.91,
            "task/accuracy/delta": -0.02,
            "task/accuracy/dense": 0.93,
        }
    )
    assert list(out)[:5] == [
        "_summary/sparsity",
        "_summary/size_mb",
        "_summary/size_to_dense",
        "_summary/task_accuracy",
        "_summary/task_accuracy_delta",
    ]
    assert out["_summary/sparsity"] == 0.123457
    assert out["_summary/size_mb"] == 2.5
    assert out["_summary/size_to_dense"] == 0.25
    assert out["_summary/task_accuracy_delta"] == -0.02
