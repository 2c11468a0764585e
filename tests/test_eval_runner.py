"""Evaluators and the sweep report through the real runner and a real sqlite MLflow store."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib
import pytest

from sparsify_exp.runner import run_overrides
from sparsify_exp.runner.tracking.store import find_sweep_runs, find_sweeps

matplotlib.use("Agg")
import matplotlib.image as mpimg

_calls: list[str] = []


def accuracy_then_crash(model) -> dict[str, float]:
    """A user's task callable that works on the dense model and fails on the sparse one."""
    _calls.append("call")
    if len(_calls) > 1:
        raise ZeroDivisionError("my metric divided by the number of kept weights")
    return {"accuracy": 0.5}


def test_broken_task_callable_fails_the_run_with_its_reason(store):
    _calls.clear()
    with pytest.raises(RuntimeError, match="my metric divided"):
        run_overrides(
            [
                "data=digits_mlp",
                "eval=[fidelity,task]",
                f"eval.task.fn={__name__}.accuracy_then_crash",
                "output.progress=none",
            ],
            output_dir=store.dir / "job",
        )
    (run,) = store.runs()
    assert run.info.status == "FAILED"
    reason = run.data.tags["sparsify.failure"]
    assert "evaluator 'task' failed in on_end" in reason
    assert "ZeroDivisionError: my metric divided by the number of kept weights" in reason
    # what was measured before the failure stays: the dense task metric, the fidelity
    assert run.data.metrics["task/accuracy/dense"] == 0.5
    assert "task/accuracy/sparse" not in run.data.metrics
    assert 0 < run.data.metrics["fidelity/rel_error"] < 1


def test_digits_sweep_report_matches_children(store, cli):
    proc = cli(
        [
            "-m",
            "data=digits_mlp",
            "eval=[fidelity,digits_accuracy]",
            "sparsifier=data_norm",
            "sparsifier.sparsity_level=0.1,0.99",
            "output.progress=none",
            "mlflow.mask_images=0",
        ],
        cwd=store.dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = store.client
    (parent,) = find_sweeps(client, "sparsify_exp")
    parent, children = find_sweep_runs(client, parent.info.run_id)
    by_level = {float(c.data.params["sparsifier.sparsity_level"]): c for c in children}
    assert sorted(by_level) == [0.1, 0.99]

    # the task evaluator through the runner: dense far above chance, 0.99 worse than 0.1
    low, high = by_level[0.1].data.metrics, by_level[0.99].data.metrics
    assert low["task/accuracy/dense"] > 0.8
    assert high["task/accuracy/sparse"] < low["task/accuracy/sparse"]
    assert high["fidelity/rel_error"] > low["fidelity/rel_error"]

    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert arts == {
        "report/sweep_report.csv",
        "report/sweep_report.md",
        "report/quality_vs_sparsity.png",
        "report/size_vs_sparsity.png",
        "report/tradeoff.html",
    }
    local = client.download_artifacts(parent.info.run_id, "report", str(store.dir / "dl"))
    with open(f"{local}/sweep_report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["run_id"] for r in rows} == {c.info.run_id for c in children}
    for row in rows:
        metrics = next(c for c in children if c.info.run_id == row["run_id"]).data.metrics
        assert row["status"] == "FINISHED"
        for key in (
            "sparsity/overall",
            "task/accuracy/dense",
            "task/accuracy/sparse",
            "task/loss/sparse",
            "fidelity/rel_error",
            "fidelity/energy_kept",
            "size/dense_bytes",
            "size/compressed_bytes",
        ):
            assert math.isclose(float(row[key]), metrics[key], rel_tol=1e-9), key
    for name in ("quality_vs_sparsity.png", "size_vs_sparsity.png"):
        data = Path(local, name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert mpimg.imread(f"{local}/{name}").shape[0] > 200
