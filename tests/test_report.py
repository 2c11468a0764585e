"""The sweep report, from runs written to a real sqlite MLflow store."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib
import mlflow
import pandas as pd
import pytest
import warm_cli

from sparsify_exp.runner.sweep import report as rep

matplotlib.use("Agg")
import matplotlib.image as mpimg

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BLOCKS = ["[1,4]", "[1,16]", "[4,4]"]  # numeric order, not text order
LEVELS = [0.2, 0.5, 0.8]


def _child_metrics(block: str, level: float) -> dict[str, float]:
    """Deterministic, distinct metrics for each job (a bigger block loses more)."""
    penalty = {"[1,4]": 1.0, "[1,16]": 1.3, "[4,4]": 1.5}[block]
    sparsity = level * (1 - 0.02 * penalty)
    metrics = {
        "sparsity/overall": sparsity,
        "size/dense_bytes": 4_000_000.0,
        "size/compressed_bytes": 4_000_000.0 * (1.02 - sparsity) + 1234,
        "fidelity/rel_error": min(1.0, 0.4 * level * penalty),
        "fidelity/energy_kept": 1 - min(1.0, 0.4 * level * penalty) ** 2,
        "fidelity/rel_error/emb": 0.123,  # per-name: not a report column
        "embedding_bag/cosine_mean": 1 - 0.3 * level * penalty,
        "embedding_bag/cosine_p05": 1 - 0.5 * level * penalty,
        "embedding_bag/cosine_mean/emb": 0.5,
        "embedding_bag/forward_time_ratio": 1.0 + 0.01 * level,
        "other/unrelated": 3.0,
    }
    return metrics


def make_sweep(tracking_uri: str, failed: bool = False) -> tuple[mlflow.MlflowClient, str, dict]:
    """A parent run and 3 x 3 child runs, laid out the way the runner writes them."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp_id = client.create_experiment("sweep")
    parent = client.create_run(exp_id, run_name="sweep-parent", tags={"sparsify.sweep": "true"})
    expected = {}
    for i, (block, level) in enumerate((b, lv) for b in BLOCKS for lv in LEVELS):
        overrides = [
            "data=embeddings",
            f"sparsifier.sparse_block_shape={block}",
            f"sparsifier.sparsity_level={level}",
        ]
        run = client.create_run(
            exp_id,
            run_name=f"job-{i}",
            tags={
                "mlflow.parentRunId": parent.info.run_id,
                "sparsify.overrides": " ".join(overrides),
                "sparsify.evaluators": "fidelity,embedding_bag",
            },
        )
        metrics = _child_metrics(block, level)
        for step in range(3):  # per-step sparsity: the report takes the last
            client.log_metric(
                run.info.run_id,
                "sparsity/overall",
                metrics["sparsity/overall"] * step / 2,
                step=step,
            )
        for key, value in metrics.items():
            if key != "sparsity/overall":
                client.log_metric(run.info.run_id, key, value)
        status = "FINISHED"
        if failed and i == len(BLOCKS) * len(LEVELS) - 1:
            status = "FAILED"
            client.set_tag(run.info.run_id, "sparsify.failure", "ValueError: boom")
        client.set_terminated(run.info.run_id, status)
        expected[run.info.run_id] = (block, level, metrics, status)
    return client, parent.info.run_id, expected


@pytest.fixture
def sweep(store):  # `store`: a migrated sqlite store in tmp_path (tests/conftest.py)
    return make_sweep(store.uri, failed=True)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img.std() > 0.01  # not a blank canvas


def test_parse_overrides_reads_the_runner_tag():
    # tag sparsify.overrides: the job's Hydra overrides joined by single spaces (job.py)
    overrides = [
        "sparsifier.sparse_block_shape=[1,4]",
        "sparsifier.sparsity_level=0.5",
        "eval=[fidelity, embedding_bag]",
        "mlflow.run_name='a b'",
        "+x=1",
        "++y=[[1, 2], [3]]",
        "~z",
    ]
    assert rep.parse_overrides(" ".join(overrides)) == {
        "sparsifier.sparse_block_shape": "[1,4]",
        "sparsifier.sparsity_level": "0.5",
        "eval": "[fidelity, embedding_bag]",
        "mlflow.run_name": "'a b'",
        "x": "1",
        "y": "[[1, 2], [3]]",
    }
    assert rep.parse_overrides("") == {} and rep.parse_overrides(None) == {}


@pytest.mark.parametrize(
    ("key", "is_level"),
    [
        ("sparsifier.sparsity_level", True),
        ("schedule.scheduler.target", True),
        ("per_name.rules.0.config.sparsity_level", True),
        ("sparsifier.sparse_block_shape", False),
        ("sparsifier", False),
        ("schedule.steps", False),
    ],
)
def test_level_keys_are_the_x_axis_not_a_line(key, is_level):
    assert bool(rep.LEVEL_KEY_PATTERN.search(key)) is is_level


def test_quality_keys_skip_per_name_breakdowns():
    keys = ["fidelity/rel_error", "fidelity/rel_error/a.b", "task/accuracy/dense", "size/x"]
    keys += ["task/accuracy/sparse", "task/accuracy/delta", "mine/score"]
    # the user's own measures first; within a metric: sparse, delta, dense
    assert rep.quality_keys_of(keys, ["fidelity", "task", "mine"]) == [
        "mine/score",
        "task/accuracy/sparse",
        "task/accuracy/delta",
        "task/accuracy/dense",
        "fidelity/rel_error",
    ]


def test_report_rows_match_child_runs(sweep, tmp_path):
    client, parent_id, expected = sweep
    out = tmp_path / "out"
    report = rep.write_sweep_report(client, parent_id, out)
    rows = _read_csv(out / "sweep_report.csv")
    assert len(rows) == len(expected) == 9
    assert report.varied_keys == ["sparsifier.sparse_block_shape", "sparsifier.sparsity_level"]
    assert report.series_keys == ["sparsifier.sparse_block_shape"]
    assert report.common_overrides == {"data": "embeddings"}
    assert "other/unrelated" not in rows[0] and "fidelity/rel_error/emb" not in rows[0]
    for row in rows:
        block, level, metrics, status = expected[row["run_id"]]
        assert row["status"] == status
        assert row["sparsifier.sparse_block_shape"] == block
        assert float(row["sparsifier.sparsity_level"]) == level
        for key in (
            "sparsity/overall",
            "fidelity/rel_error",
            "fidelity/energy_kept",
            "embedding_bag/cosine_mean",
            "embedding_bag/cosine_p05",
            "embedding_bag/forward_time_ratio",
            "size/dense_bytes",
            "size/compressed_bytes",
        ):
            assert math.isclose(float(row[key]), metrics[key], rel_tol=1e-9), key
        assert math.isclose(
            float(row["size/compressed_to_dense"]),
            metrics["size/compressed_bytes"] / metrics["size/dense_bytes"],
        )
        assert (row["error"] == "ValueError: boom") == (status == "FAILED")
    # rows come out grouped by block shape, then by level
    assert [
        (r["sparsifier.sparse_block_shape"], float(r["sparsifier.sparsity_level"])) for r in rows
    ] == [(b, lv) for b in BLOCKS for lv in LEVELS]

    md = (out / "sweep_report.md").read_text()
    assert md.count("\n| ") == 10 and "| FAILED |" in md and "data=embeddings" in md
    for name in ("quality_vs_sparsity.png", "size_vs_sparsity.png"):
        _assert_png(out / name)

    logged = {f.path for f in client.list_artifacts(parent_id, "report")}
    assert logged == {
        "report/sweep_report.csv",
        "report/sweep_report.md",
        "report/quality_vs_sparsity.png",
        "report/size_vs_sparsity.png",
    }
    # what was logged is what was written
    local = client.download_artifacts(parent_id, "report/sweep_report.csv", str(tmp_path / "dl"))
    assert Path(local).read_text() == (out / "sweep_report.csv").read_text()


def test_report_of_sweep_without_varied_options(store, tmp_path):
    client = mlflow.MlflowClient(tracking_uri=store.uri)
    exp_id = client.create_experiment("one")
    parent = client.create_run(exp_id, tags={"sparsify.sweep": "true"})
    run = client.create_run(exp_id, tags={"mlflow.parentRunId": parent.info.run_id})
    client.log_metric(run.info.run_id, "sparsity/overall", 0.5)
    client.log_metric(run.info.run_id, "task/accuracy/sparse", 0.7)
    client.log_metric(run.info.run_id, "task/accuracy/dense", 0.9)
    client.set_terminated(run.info.run_id)
    report = rep.build_sweep_report(client, parent.info.run_id, tmp_path / "r")
    assert report.table[report.quality_keys].to_dict("records") == [
        {"task/accuracy/sparse": 0.7, "task/accuracy/dense": 0.9}
    ]
    md = (tmp_path / "r" / "sweep_report.md").read_text()
    # a dense value shared by every job is stated once, above the table
    assert "Dense baseline (every job): `task/accuracy/dense` = 0.9." in md
    assert "| task/accuracy/sparse |" in md and "| task/accuracy/dense |" not in md
    assert (tmp_path / "r" / "quality_vs_sparsity.png").is_file()
    assert not (tmp_path / "r" / "size_vs_sparsity.png").exists()  # no sizes logged


def test_cli_rebuilds_report_from_store(sweep, tmp_path, capsys):
    client, parent_id, expected = sweep
    uri = client.tracking_uri
    out = tmp_path / "cli"
    proc = warm_cli.run(
        "sparsify_exp.report",
        ["--experiment", "sweep", "--tracking-uri", uri, "--out", str(out)],
        tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert parent_id in proc.stdout
    assert {r["run_id"] for r in _read_csv(out / "sweep_report.csv")} == set(expected)
    assert len(client.list_artifacts(parent_id, "report")) == 4

    # the error paths, in-process
    assert rep.main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("empty")
    assert rep.main(["--experiment", "empty", "--tracking-uri", uri]) == 2
    assert "no sweep parent run" in capsys.readouterr().err
    assert rep.main(["--experiment", "sweep", "--parent", "0" * 32, "--tracking-uri", uri]) == 2
    assert f"error: sweep {'0' * 32}: Run" in capsys.readouterr().err
    # without --out, the table still comes to the terminal
    assert rep.main(["--experiment", "sweep", "--tracking-uri", uri, "--parent", parent_id]) == 0
    shown = capsys.readouterr().out
    assert shown.count("| FINISHED |") == 8 and "parent run artifacts report/" in shown


def test_merge_makes_one_report_of_several_sweeps(sweep, tmp_path, capsys):
    client, first, expected = sweep
    exp_id = client.get_run(first).info.experiment_id
    second = client.create_run(exp_id, run_name="other", tags={"sparsify.sweep": "true"})
    for level in LEVELS:
        run = client.create_run(
            exp_id,
            run_name="job-0" if level == LEVELS[0] else f"mag-{level}",  # job-0: a name clash
            tags={
                "mlflow.parentRunId": second.info.run_id,
                "sparsify.overrides": f"data=embeddings sparsifier=magnitude "
                f"sparsifier.sparsity_level={level}",
            },
        )
        client.log_metric(run.info.run_id, "sparsity/overall", level)
        client.set_terminated(run.info.run_id, "FINISHED")
    out = tmp_path / "merged"
    args = ["--experiment", "sweep", "--tracking-uri", client.tracking_uri, "--out", str(out)]
    assert rep.main([*args, "--all", "--merge"]) == 0
    assert "2 sweeps: 12 jobs" in capsys.readouterr().out
    rows = _read_csv(out / "sweep_report.csv")
    assert len(rows) == len(expected) + len(LEVELS)
    names = [r["run_name"] for r in rows]
    assert "s1: job-0" in names and "s2: job-0" in names  # the latest sweep is s1
    assert {r["sparsifier"] for r in rows} == {"", "magnitude"}
    merged = {f.path for f in client.list_artifacts(second.info.run_id, "report/merged")}
    assert "report/merged/sweep_report.md" in merged
    assert "# Report of 2 sweeps: experiment sweep" in (out / "sweep_report.md").read_text()


def test_plots_draw_coinciding_series_once_and_keep_timing_noise_flat(tmp_path):
    import matplotlib.pyplot as plt

    from sparsify_exp.runner.sweep import plots

    rows = []
    for method in ("data_norm", "magnitude"):  # the same points: drawn once, one label
        for level, ratio in ((0.5, 0.99), (0.8, 1.01 if method == "magnitude" else 1.0)):
            rows.append(
                {
                    "run_id": f"{method}{level}",
                    "run_name": f"{method} level={level}",
                    "status": "FINISHED",
                    "method": method,
                    "sparsity/overall": level,
                    "fidelity/rel_error": level / 2,
                    "embedding_bag/forward_time_ratio": ratio,
                    "size/dense_bytes": 1e6,
                    "size/compressed_bytes": 1e6 * (1 - level),
                }
            )
    report = rep.SweepReport(
        "p",
        "t",
        pd.DataFrame(rows),
        ["method"],
        {},
        ["embedding_bag/forward_time_ratio", "fidelity/rel_error"],
        ["method"],
        pick="magnitude level=0.5",
        pick_bounds={"_summary/fidelity_rel_error": ["<=", 0.3]},
    )
    groups = plots._series(report)
    merged = plots._merge_coinciding(groups, "fidelity/rel_error")
    assert list(merged) == ["method=data_norm = method=magnitude"]
    fig, ax = plt.subplots()
    plots._lines(ax, groups, "embedding_bag/forward_time_ratio", "ratio")
    plots._timing_axis(ax)
    assert ax.get_ylim()[0] <= 0.75 and ax.get_ylim()[1] >= 1.25  # 0.99-1.01 stays flat
    plots._bound(ax, report, "fidelity/rel_error")
    plots._pick(ax, report, "fidelity/rel_error")
    labels = ax.get_legend_handles_labels()[1]
    assert labels == [
        "method=data_norm",  # the timing ratios differ: two lines
        "method=magnitude",
        "bound: at most 0.3",
        "pick: magnitude level=0.5",
    ]
    plt.close(fig)
    assert plots.plot_size(report, tmp_path / "size.png")
    assert plots.plot_quality(report, tmp_path / "quality.png")
    _assert_png(tmp_path / "size.png")
