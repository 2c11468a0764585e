"""Data names that MLflow or the file system would refuse, or that clean to the same key:
the run finishes, every name gets its own keys and mask picture, the exact names stay."""

from __future__ import annotations

import csv
from pathlib import Path

from sparsify_exp import load_masks
from sparsify_exp.runner import run_overrides
from sparsify_exp.runner.tracking.keys import (
    MAX_KEY_LENGTH,
    name_file_stem,
    per_name_key,
    short_hash,
)

LONG = "x" * 300
NAMES = ["\u03b1.w", "\u03b2.w", "dup/x", "dup_x", "..", LONG, "plain.weight"]


def test_keys_are_valid_bounded_and_distinct():
    keys = [per_name_key("fidelity/rel_error", n) for n in NAMES]
    stems = [name_file_stem(n) for n in NAMES]
    assert len(set(keys)) == len(keys) and len(set(stems)) == len(stems)
    assert all(len(k) <= MAX_KEY_LENGTH for k in keys) and all(len(s) <= 120 for s in stems)
    assert per_name_key("sparsity", "plain.weight") == "sparsity/plain.weight"  # as is
    assert per_name_key("sparsity", "dup/x") == "sparsity/dup/x"  # valid: MLflow's groups
    assert per_name_key("sparsity", "..") == f"sparsity/__-{short_hash('..')}"
    assert name_file_stem("dup_x") == "dup_x"
    assert name_file_stem("dup/x") == f"dup_x-{short_hash('dup/x')}"
    assert per_name_key("sparsity", "\u03b1.w") == per_name_key("sparsity", "\u03b1.w")  # stable


def test_a_run_with_names_that_would_break_or_collide_finishes(store, tmp_path):
    tensors = ",".join(f"{{name:'{n}',shape:[8,6]}}" for n in NAMES)
    run_id = run_overrides(
        [
            "data=tensors",
            f"data.tensors=[{tensors}]",
            "sparsifier=magnitude",
            "sparsifier.scope=local",
            "sparsifier.sparsity_level=0.5",
            "schedule.steps=2",
        ],
        output_dir=tmp_path / "job",
    )
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("sparsify.failure")
    assert "sparsify.rejected" not in run.data.tags  # no key the store refused
    artifacts = tmp_path / "job" / "artifacts"
    with (artifacts / "per_name.csv").open() as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(NAMES)  # the exact names
    assert set(load_masks(artifacts / "masks" / "final.safetensors")) == set(NAMES)
    metrics = run.data.metrics
    for name in NAMES:  # each name its own key, with its own table value
        key = per_name_key("fidelity/rel_error", name)
        assert abs(metrics[key] - float(rows[name]["fidelity/rel_error"])) < 1e-5, name
        assert per_name_key("sparsity", name) in metrics
    pictures = sorted(p.name for p in (artifacts / "masks" / "png").iterdir())
    assert pictures == sorted(f"{name_file_stem(n)}.png" for n in NAMES)
    assert Path(tmp_path / "job" / "artifacts" / "data" / "sparsified.safetensors").is_file()
