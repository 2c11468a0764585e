"""The pick a user can trust and change: a plain override replaces the rule's mappings, ties
go to the better quality, and a pick at the edge of the grid says so."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from mlflow.entities import Metric

from sparsify_exp.runner.cli import compose_config
from sparsify_exp.runner.config import normalize_overrides
from sparsify_exp.runner.sweep.pick import describe, pick_child

DOCS = Path(__file__).resolve().parents[1] / "docs"
MAPPING_OVERRIDE = re.compile(r"'((?:sweep\.pick\.(?:min|max)|objective\.max)=\{[^']*\})'")


def _doc_overrides() -> list[str]:
    found = []
    for doc in (*DOCS.glob("*.md"), DOCS.parent / "README.md"):
        found += MAPPING_OVERRIDE.findall(doc.read_text())
    return [o for o in found if "..." not in o]  # not a placeholder: `{...}`


def test_the_docs_have_mapping_overrides():
    assert "sweep.pick.max={}" in _doc_overrides()
    assert "sweep.pick.min={_summary/task_accuracy_delta: -0.005}" in _doc_overrides()


@pytest.mark.parametrize("override", _doc_overrides())
def test_each_documented_override_gives_exactly_its_mapping(override):
    key, value = override.split("=", 1)
    cfg = compose_config([override])
    node = cfg
    for part in key.split("."):
        node = node[part]
    assert dict(node) == yaml.safe_load(value)


def test_the_docs_digits_rule_has_one_bound():
    cfg = compose_config(
        ["sweep.pick.min={_summary/task_accuracy_delta: -0.005}", "sweep.pick.max={}"]
    )
    assert dict(cfg.sweep.pick.min) == {"_summary/task_accuracy_delta": -0.005}
    assert dict(cfg.sweep.pick.max) == {}


def test_recorded_overrides_paste_back():
    once = normalize_overrides(["sweep.pick.max={}", "sparsifier.sparsity_level=0.5"])
    assert once == ["~sweep.pick.max", "+sweep.pick.max={}", "sparsifier.sparsity_level=0.5"]
    assert normalize_overrides(once) == once
    assert dict(compose_config(once).sweep.pick.max) == {}


def test_cfg_job_shows_the_replaced_rule(tmp_path):
    from conftest import run_cli

    proc = run_cli(
        ["sweep.pick.max={}", "sweep.pick.min={_summary/x: 0.95}", "--cfg", "job"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    pick = yaml.safe_load(proc.stdout)["sweep"]["pick"]
    assert pick["max"] == {}
    assert pick["min"] == {"_summary/x": 0.95}


def _runs(store, values: list[dict[str, float]]) -> list:
    client = store.client
    exp = client.create_experiment("pick")
    runs = []
    for i, metrics in enumerate(values):
        run = client.create_run(exp, run_name=f"r{i}")
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        client.set_terminated(run.info.run_id, "FINISHED")
        runs.append(client.get_run(run.info.run_id))
    return runs


def test_ties_go_to_the_better_quality_not_the_first_started(store):
    cos = "_summary/embedding_bag_cosine_mean"
    runs = _runs(
        store,
        [
            {"_summary/sparsity": 0.5, cos: 0.9562},
            {"_summary/sparsity": 0.5000001, cos: 0.9585},
            {"_summary/sparsity": 0.7, cos: 0.90},
        ],
    )
    pick = pick_child(runs, {"min": {cos: 0.95}})
    assert pick.name == "r1"
    assert not pick.at_edge  # 0.7 was tried and broke the bound


def test_a_pick_at_the_edge_of_the_grid_says_so(store):
    runs = _runs(
        store,
        [
            {"_summary/sparsity": 0.3, "_summary/fidelity_rel_error": 0.2},
            {"_summary/sparsity": 0.6, "_summary/fidelity_rel_error": 0.4},
        ],
    )
    pick = pick_child(runs, {"max": {"_summary/fidelity_rel_error": 0.5}})
    assert pick.name == "r1"
    assert pick.at_edge == "the highest sparsity tried: extend the sweep"
    assert describe(pick, ["_summary/sparsity"]).endswith(
        "; the highest sparsity tried: extend the sweep"
    )
