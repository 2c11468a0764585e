"""The runner end to end against a real sqlite MLflow store: runs, sweeps, failures."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsify_exp.masks import load_masks
from sparsify_exp.runner import run_overrides
from sparsify_exp.runner.evaluation import Evaluator
from sparsify_exp.runner.tracking.store import find_sweep_runs, find_sweeps


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _artifacts(client, run_id: str, path: str = "") -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path or None):
        out |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def test_card_command_end_to_end(store, migrated_db, cli):
    """`python -m sparsify_exp sparsifier=first_row data=embeddings` with MLflow's default
    store resolution: sqlite:///mlflow.db in the launch directory."""
    proc = cli(
        ["sparsifier=first_row", "data=embeddings"],
        cwd=store.dir,
        env={"MLFLOW_TRACKING_URI": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 1/1" in proc.stdout + proc.stderr  # plain log lines when not a terminal
    (run,) = store.runs()
    client, rid = store.client, run.info.run_id
    assert run.info.status == "FINISHED"

    p = run.data.params
    assert p["sparsifier._target_"] == "sparsify_exp.FirstRowSparsifier"
    assert p["data.tables.1.kind"] == "embedding_bag"
    assert p["schedule.steps"] == "1"
    tags = run.data.tags
    assert tags["sparsify.choice.sparsifier"] == "first_row"
    assert tags["sparsify.choice.data"] == "embeddings"
    assert "sparsify.choice.method" not in tags  # no preset: nothing to say
    assert "sparsify.heartbeat" not in tags  # an ended run has no heartbeat
    assert tags["sparsify.overrides"] == "sparsifier=first_row data=embeddings"
    assert tags["sparsify.evaluators"] == "fidelity"

    # row 0 of each table: 64 + 32 + 16 entries of 20000*64 + 50000*32 + 1000*16
    expected = (64 + 32 + 16) / (20000 * 64 + 50000 * 32 + 1000 * 16)
    assert _history(client, rid, "sparsity/overall") == [(0, pytest.approx(expected))]
    assert _history(client, rid, "sparsity/tables.category") == [(0, pytest.approx(1 / 1000))]
    assert run.data.metrics["sparsity/max"] == pytest.approx(1 / 1000)
    assert run.data.metrics["sparsity/min"] == pytest.approx(1 / 50000)
    assert "fidelity/rel_error" in run.data.metrics
    assert run.data.metrics["size/dense_bytes"] > 0

    arts = _artifacts(client, rid)
    for a in (
        "config/config.yaml",
        "masks/final.safetensors",
        "masks/png/tables.user.png",
        "masks/png/tables.item.png",
        "per_name.csv",
        "data/sparsified.safetensors",
    ):
        assert a in arts, arts
    local = Path(client.download_artifacts(rid, "", str(store.dir / "dl")))
    masks = load_masks(local / "masks" / "final.safetensors")
    assert masks["tables.user"].shape == (20000, 64) and masks["tables.user"].dtype == torch.bool
    assert not masks["tables.user"][0].any() and masks["tables.user"][1:].all()
    data = load_file(str(local / "data" / "sparsified.safetensors"))
    assert set(data) == {"tables.user", "tables.item", "tables.category"}
    assert (data["tables.item"][0] == 0).all() and (data["tables.item"][1:] != 0).all()
    assert (local / "masks" / "png" / "tables.user.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(io.StringIO((local / "per_name.csv").read_text())))
    assert [r["name"] for r in rows] == ["tables.user", "tables.item", "tables.category"]
    assert rows[1]["shape"] == "50000x32" and rows[1]["kind"] == "embedding_bag"
    assert (store.dir / "mlflow.db").is_file()


def test_schedule_logs_every_step_with_churn_and_limits_name_keys(store):
    rid = run_overrides(
        [
            "data=tensors",
            "schedule=linear",
            "schedule.steps=4",
            "sparsifier.sparsity_level=0.6",
            "mlflow.max_name_metrics=1",
            "mlflow.masks_every=2",
            "eval=[]",
            "output.progress=none",
        ],
        output_dir=store.dir / "job",
    )
    client = store.client
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    sched = _history(client, rid, "schedule/sparsity_level")
    assert [s for s, _ in sched] == [0, 1, 2, 3]
    assert [v for _, v in sched] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    overall = [v for _, v in _history(client, rid, "sparsity/overall")]
    assert overall == sorted(overall) and overall[0] == 0.0
    assert overall[-1] == pytest.approx(0.6, abs=0.01)
    churn = _history(client, rid, "churn/overall")
    assert [s for s, _ in churn] == [1, 2, 3] and all(v > 0 for _, v in churn)
    per_name = [k for k in run.data.metrics if k.startswith("sparsity/")]
    assert sorted(per_name) == [
        "sparsity/encoder.layer0.weight",
        "sparsity/max",
        "sparsity/mean",
        "sparsity/min",
        "sparsity/overall",
    ]
    arts = _artifacts(client, rid)
    assert "masks/step_000001.safetensors" in arts and "masks/final.safetensors" in arts
    assert "masks/png/encoder.layer0.weight.png" in arts
    assert "masks/png/encoder.layer0.bias.png" not in arts  # 1-D: no picture
    assert run.data.tags["sparsify.evaluators"] == ""


def test_per_name_rules_skip_and_override(store):
    rid = run_overrides(
        ["data=tensors", "per_name=example", "eval=[]", "output.progress=none"],
        output_dir=store.dir / "job",
    )
    run = store.client.get_run(rid)
    m = run.data.metrics
    assert "sparsity/encoder.layer0.bias" not in m  # skipped: kept dense
    assert m["sparsity/encoder.layer1.weight"] == pytest.approx(0.8, abs=1e-3)  # whole blocks
    assert m["sparsity/encoder.layer0.weight"] == pytest.approx(0.5)
    assert run.data.params["data.names_skipped"] == "1"
    local = Path(store.client.download_artifacts(rid, "", str(store.dir / "dl")))
    rows = {r["name"]: r for r in csv.DictReader((local / "per_name.csv").open())}
    assert rows["encoder.layer0.bias"]["sparsified"] == "False"
    data = load_file(str(local / "data" / "sparsified.safetensors"))
    assert (data["encoder.layer0.bias"] != 0).all()  # written, untouched


def test_file_sources_are_written_back_in_their_format(store):
    sd = {"model": {"enc.weight": torch.randn(8, 16), "enc.step": torch.tensor(7)}}
    torch.save(sd, store.dir / "ckpt.pt")
    rid = run_overrides(
        ["data=file", "data.path=ckpt.pt", "eval=[]", "output.progress=none"],
        output_dir=store.dir / "job_pt",
    )
    local = Path(store.client.download_artifacts(rid, "data", str(store.dir / "dl_pt")))
    out = torch.load(local / "sparsified.pt", weights_only=True)
    assert out["model"]["enc.step"] == 7
    assert (out["model"]["enc.weight"] == 0).float().mean() == pytest.approx(0.5)

    save_file(
        {"a.weight": torch.randn(4, 8), "a.bias": torch.randn(4)},
        str(store.dir / "w.safetensors"),
        metadata={"origin": "test"},
    )
    rid = run_overrides(
        [
            "data=file",
            "data.path=w.safetensors",
            "data.exclude=[*.bias]",
            "eval=[]",
            "output.progress=none",
        ],
        output_dir=store.dir / "job_st",
    )
    run = store.client.get_run(rid)
    assert run.data.params["data.names"] == "1"
    assert run.data.metrics["size/compressed_bytes"] < run.data.metrics["size/dense_bytes"]
    local = Path(store.client.download_artifacts(rid, "data", str(store.dir / "dl_st")))
    out = load_file(str(local / "sparsified.safetensors"))
    assert set(out) == {"a.weight", "a.bias"}
    assert (out["a.bias"] != 0).all()


class BoomAtMasked(Evaluator):
    """Logs a metric at the start, then fails after the last step."""

    name = "boom"

    def on_start(self, ctx):
        return {"boom/started": 1.0}

    def on_masked(self, ctx):
        raise RuntimeError("boom: quality check exploded")


def test_failure_mid_run_is_failed_with_reason_and_keeps_what_was_logged(store):
    with pytest.raises(RuntimeError, match="boom"):
        run_overrides(
            [
                "data=tensors",
                "schedule=linear",
                "schedule.steps=3",
                f"+eval.boom._target_={__name__}.BoomAtMasked",
                "output.progress=none",
            ],
            output_dir=store.dir / "job",
        )
    (run,) = store.runs()
    assert run.info.status == "FAILED"
    reason = run.data.tags["sparsify.failure"]
    assert "evaluator 'boom' failed in on_masked" in reason and "quality check exploded" in reason
    assert run.data.tags["sparsify.evaluators"] == "fidelity,boom"
    client = store.client
    assert [s for s, _ in _history(client, run.info.run_id, "sparsity/overall")] == [0, 1, 2]
    assert _history(client, run.info.run_id, "boom/started") == [(0, 1.0)]
    arts = _artifacts(client, run.info.run_id)
    assert "error.txt" in arts and "config/config.yaml" in arts


@pytest.mark.slow  # the basic-launcher sweeps below keep a sweep end to end in the default run
def test_sweep_with_joblib_gives_one_parent_and_three_children(store, cli):
    proc = cli(
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",  # 2 cores here; 3 jobs still overlap
            "sparsifier=data_norm",
            "sparsifier.sparsity_level=0.2,0.5,0.8",
            "data=tensors",
        ],
        cwd=store.dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "database is locked" not in proc.stderr + proc.stdout
    client = store.client
    (parent,) = find_sweeps(client, "sparsify_exp")
    parent, children = find_sweep_runs(client, parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sparsify.sweep"] == "true"
    assert parent.data.tags["sparsify.jobs"] == "3"
    assert len(store.runs()) == 4  # parent + 3 children, one experiment
    assert sorted(r.data.params["sparsifier.sparsity_level"] for r in children) == [
        "0.2",
        "0.5",
        "0.8",
    ]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.info.experiment_id == parent.info.experiment_id
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        level = float(child.data.params["sparsifier.sparsity_level"])
        assert child.data.metrics["sparsity/overall"] == pytest.approx(level, abs=0.01)


def test_sweep_with_a_failing_job_marks_the_parent_failed(store, cli):
    (store.dir / "scores.py").write_text(
        "def ok(data):\n    return {'names': len(data)}\n\n"
        "def crash(data):\n    raise RuntimeError('scorer crashed')\n"
    )
    proc = cli(
        ["-m", "eval=[task]", "eval.task.fn=scores.ok,scores.crash"],
        cwd=store.dir,
    )
    assert proc.returncode != 0
    (parent,) = find_sweeps(store.client, "sparsify_exp")
    parent, children = find_sweep_runs(store.client, parent.info.run_id)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    failed = next(c for c in children if c.info.status == "FAILED")
    assert failed.data.tags["sparsify.failure"].startswith("RuntimeError: evaluator 'task'")
    assert "scorer crashed" in failed.data.tags["sparsify.failure"]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["sparsify.jobs_failed"] == "1"


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (64, 33), (2, 3, 4)])
def test_mask_files_use_the_library_bit_layout(shape, tmp_path):
    from safetensors.torch import load_file

    from sparsify_exp import pack_mask
    from sparsify_exp.masks import save_masks

    mask = torch.rand(shape) > 0.5

    class _Sp:
        def get_mask(self, name):
            return mask

    path = save_masks(_Sp(), ["x.weight"], tmp_path / "m.safetensors")
    assert torch.equal(load_file(str(path))["x.weight"], pack_mask(mask))
    assert torch.equal(load_masks(path)["x.weight"], mask)
    assert path.stat().st_size < 200 + mask.numel() // 8 + 1  # 1 bit an entry, plus header


def test_unreadable_torch_file_is_a_config_error_before_any_run(store, cli):
    (store.dir / "corrupt.pt").write_bytes(b"not a pickle")
    proc = cli(["data=file", "data.path=corrupt.pt", "eval=[]"], cwd=store.dir)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "weights_only=True" in proc.stderr
    assert store.runs() == []


def test_nonfinite_data_is_reported_and_masked_exactly(store, cli):
    table = torch.randn(100, 400)
    table[:10] = float("nan")  # 10% of the (1, 4) blocks hold NaN
    torch.save({"emb": table}, store.dir / "nan.pt")
    proc = cli(
        ["data=file", "data.path=nan.pt", "sparsifier.sparsity_level=0.95", "eval=[]"],
        cwd=store.dir,
    )
    assert proc.returncode == 0, proc.stderr
    assert "emb holds 4000 NaN/inf entries" in proc.stdout + proc.stderr
    (run,) = store.runs()
    assert run.data.params["data.nonfinite"] == "4000"
    assert run.data.metrics["sparsity/overall"] == pytest.approx(0.95)


def test_a_block_larger_than_the_data_is_said(store, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="sparsify_exp.runner"):
        run_overrides(
            ["sparsifier.sparse_block_shape=[100000,100000]", "eval=[]", "mlflow.mask_images=0"],
            output_dir=tmp_path / "job",
        )
    said = [r.getMessage() for r in caplog.records if "covers all of" in r.getMessage()]
    assert len(said) == 3
    assert said[0].startswith("sparse_block_shape=[100000, 100000] covers all of encoder.")


@pytest.mark.parametrize("sparsifier", ["magnitude", "nm", "row", "random"])
@pytest.mark.parametrize("data", ["embeddings", "model", "file"])
def test_every_sparsifier_runs_on_every_kind_of_data(sparsifier, data, store, tmp_path):
    overrides = [f"sparsifier={sparsifier}", "eval=[]", "mlflow.mask_images=0"]
    if data == "file":
        save_file(
            {"emb.weight": torch.randn(64, 16), "proj.weight": torch.randn(8, 16)},
            str(tmp_path / "ckpt.safetensors"),
        )
        overrides += ["data=file", f"data.path={tmp_path / 'ckpt.safetensors'}"]
    elif data == "model":
        overrides += ["data=model", "data.module.sizes=[32,16,8]", "data.exclude=[*.bias]"]
    else:
        overrides += ["data=embeddings", "data.tables.1.num_embeddings=500"]
    run = store.client.get_run(run_overrides(overrides, output_dir=tmp_path / "job"))
    assert run.info.status == "FINISHED"
    # every default removes half: level 0.5, or 2 of every 4 (nm)
    assert run.data.metrics["sparsity/overall"] == pytest.approx(0.5, abs=0.02)
    if sparsifier == "row":
        assert run.data.metrics["rows/kept"] < run.data.metrics["rows/total"]
        assert run.data.metrics["size/row_compacted_bytes"] < run.data.metrics["size/dense_bytes"]


@pytest.fixture
def tiny_disk(tmpfs):
    """A 2 MiB file system (see ``tmpfs`` in conftest)."""
    return tmpfs("2m")


def test_a_disk_that_fills_fails_the_run_with_one_line(store, cli, tiny_disk):
    proc = cli(["data=embeddings", "eval=[]", f"hydra.run.dir={tiny_disk}/run"], cwd=store.dir)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    (run,) = store.runs()
    assert run.info.status == "FAILED"
    assert "No space left on device" in run.data.tags["sparsify.failure"]
