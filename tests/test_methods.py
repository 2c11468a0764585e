"""The ``method`` group: presets that sweep together on ``sparsifier.sparsity_level``, one
parent per sweep named by what it compares, and one line for a key only some methods have."""

from __future__ import annotations

import shutil

import pytest
from conftest import run_cli
from mlflow.tracking import MlflowClient

from sparsify_exp.runner.cli import compose_config
from sparsify_exp.runner.methods import conflicting_choice, method_of
from sparsify_exp.runner.sweep.naming import choice_tags, sweep_name
from sparsify_exp.runner.tracking.store import find_sweep_runs, find_sweeps, swept_run_name

METHODS = {
    "magnitude": ("sparsify_exp.MagnitudeSparsifier", {}),
    "data_norm_1x4": (
        "sparsify_exp.DataNormSparsifier",
        {"sparse_block_shape": [1, 4], "zeros_per_block": None},
    ),
    "nm_2_4": (
        "sparsify_exp.DataNormSparsifier",
        {"sparse_block_shape": [1, 4], "zeros_per_block": 2, "sparsity_level": 1.0},
    ),
    "row_norm": ("sparsify_exp.RowSparsifier", {}),
    "row_usage": ("sparsify_exp.RowSparsifier", {"score": "usage_then_norm"}),
    "wanda": ("sparsify_exp.WandaSparsifier", {"compare": "row"}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_sets_its_sparsifier_and_takes_a_level(method):
    target, keys = METHODS[method]
    cfg = compose_config([f"method={method}"])
    assert cfg.sparsifier._target_ == target
    for key, value in keys.items():
        assert cfg.sparsifier[key] == value
    cfg = compose_config([f"method={method}", "sparsifier.sparsity_level=0.7"])
    assert cfg.sparsifier.sparsity_level == 0.7


def test_no_method_keeps_the_sparsifier_group():
    cfg = compose_config(["sparsifier=magnitude"])
    assert cfg.sparsifier._target_ == "sparsify_exp.MagnitudeSparsifier"


def test_a_method_with_a_sparsifier_is_one_line():
    line = conflicting_choice(["method=magnitude", "sparsifier=row"])
    assert line == (
        "method=magnitude sparsifier=row: a method chooses its own sparsifier; give one of the two"
    )
    assert conflicting_choice(["method=none", "sparsifier=row"]) is None
    assert method_of(["sparsifier=row"]) == "row"
    assert method_of(["method=nm_2_4", "sparsifier.sparsity_level=0.5"]) == "nm_2_4"


def test_names_say_what_was_swept():
    swept = {"method": "magnitude,nm_2_4", "sparsifier.sparsity_level": "0.5,0.7"}
    choices = {"method": "none", "sparsifier": "data_norm", "data": "embeddings", "hydra/x": "y"}
    assert sweep_name(choices, swept) == (
        "sweep on embeddings: method magnitude,nm_2_4 x level 0.5,0.7"
    )
    assert choice_tags(choices, swept) == {"method": "magnitude,nm_2_4", "data": "embeddings"}
    fixed = {"method": "magnitude", "sparsifier": "magnitude", "data": "tensors"}
    assert sweep_name(fixed, {"sparsifier.sparsity_level": "0.5,0.7"}) == (
        "sweep magnitude on tensors: level 0.5,0.7"
    )
    plain = {"method": "none", "sparsifier": "data_norm", "data": "tensors"}
    assert sweep_name(plain, {"sparsifier": "data_norm,magnitude"}) == (
        "sweep on tensors: sparsifier data_norm,magnitude"
    )
    assert "sparsifier" in choice_tags(plain, {"sparsifier": "data_norm,magnitude"})
    assert swept_run_name(
        ["method=nm_2_4", "sparsifier.sparsity_level=0.5"], ["method", "sparsifier.sparsity_level"]
    ) == ("nm_2_4 level=0.5")


@pytest.fixture(scope="module")
def method_sweep(tmp_path_factory, migrated_db):
    folder = tmp_path_factory.mktemp("methods")
    shutil.copy(migrated_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    proc = run_cli(
        [
            "-m",
            "method=magnitude,data_norm_1x4,nm_2_4",
            "sparsifier.sparsity_level=0.5,1.0",
            "output.write_data=false",
            "mlflow.mask_images=0",
            f"mlflow.tracking_uri={uri}",
        ],
        cwd=folder,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    (parent,) = find_sweeps(client, "sparsify_exp")
    return proc, client, *find_sweep_runs(client, parent.info.run_id)


def test_methods_sweep_as_one_parent(method_sweep):
    _, _, parent, children = method_sweep
    assert parent.info.run_name == (
        "sweep on tensors: method magnitude,data_norm_1x4,nm_2_4 x level 0.5,1.0"
    )
    assert parent.data.tags["sparsify.choice.method"] == "magnitude,data_norm_1x4,nm_2_4"
    assert "sparsify.choice.sparsifier" not in parent.data.tags
    names = sorted(c.info.run_name for c in children)
    assert names == [
        f"{m} level={v}" for m in ("data_norm_1x4", "magnitude", "nm_2_4") for v in ("0.5", "1.0")
    ]
    by_name = {c.info.run_name: c for c in children}
    nm = by_name["nm_2_4 level=1.0"]
    assert nm.data.tags["sparsify.choice.method"] == "nm_2_4"
    assert nm.data.metrics["sparsity/overall"] == pytest.approx(0.5)  # every group 2:4
    assert by_name["nm_2_4 level=0.5"].data.metrics["sparsity/overall"] == pytest.approx(0.25)
    assert by_name["magnitude level=0.5"].data.params["sparsifier._target_"] == (
        "sparsify_exp.MagnitudeSparsifier"
    )


def test_a_key_only_some_methods_have_is_one_line_before_any_job(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(
        [
            "-m",
            "method=magnitude,data_norm_1x4,row_norm",
            "sparsifier.sparsity_level=0.5,0.7",
            "sparsifier.sparse_block_shape=[1,1],[1,4]",
            f"mlflow.tracking_uri={uri}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "Could not override" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "sparse_block_shape" in line]
    assert lines == [
        "  sparsifier.sparse_block_shape: magnitude, row_norm have no such key (only "
        "data_norm_1x4 has it): sweep it in a separate sweep of those methods"
    ]
    assert not (tmp_path / "multirun").exists()
    assert not (tmp_path / "mlflow.db").exists()
