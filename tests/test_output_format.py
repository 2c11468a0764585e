"""`output.format=dense|bitmask|rows`: the file written is the size the run logs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsify_exp import RemappedEmbedding, load_masks, load_sparse
from sparsify_exp.runner import run_overrides
from sparsify_exp.runner.config import ConfigError

FAST = ["mlflow.mask_images=0", "eval=[]"]


def _run(store, tmp_path: Path, *overrides: str):
    out = tmp_path / "job"
    rid = run_overrides([*FAST, *overrides], output_dir=out)
    run = store.client.get_run(rid)
    assert run.info.status == "FINISHED"
    return run, out / "artifacts"


def test_bitmask_file_is_the_logged_size_and_loads_as_the_squash(store, tmp_path):
    common = [
        "data=tensors",
        "sparsifier=magnitude",
        "sparsifier.sparsity_level=0.5",
        "data.tensors=[{name: a.weight, shape: [64, 48]}, {name: b, shape: [300]}]",
    ]
    dense_run, dense_art = _run(store, tmp_path / "d", *common)
    run, art = _run(store, tmp_path / "s", *common, "output.format=bitmask")
    path = art / "data" / "sparsified.safetensors"
    m = run.data.metrics
    assert m["size/compressed_bytes"] == path.stat().st_size
    assert m["size/compressed_bytes"] < 0.7 * m["size/dense_bytes"]
    dense = load_file(str(dense_art / "data" / "sparsified.safetensors"))
    loaded = load_sparse(path)
    assert set(loaded) == set(dense)
    for name in dense:
        assert torch.equal(loaded[name], dense[name]), name
    masks = load_masks(art / "masks" / "final.safetensors")
    assert torch.equal(loaded["a.weight"] != 0, masks["a.weight"])
    # the dense run's estimate of the same encoding: within the headers and row offsets
    estimate = dense_run.data.metrics["size/compressed_bytes"]
    assert abs(estimate - m["size/compressed_bytes"]) < 2000


def test_rows_format_writes_kept_rows_and_a_remap(store, tmp_path):
    run, art = _run(
        store,
        tmp_path,
        "data=embeddings",
        "data.tables=[{name: user, kind: embedding, num_embeddings: 500, embedding_dim: 16}]",
        "sparsifier=row",
        "sparsifier.sparsity_level=0.5",
        "output.format=rows",
    )
    path = art / "data" / "sparsified.safetensors"
    assert run.data.metrics["size/compressed_bytes"] == path.stat().st_size
    # 250 rows of 16 floats + a 500-entry int32 remap, and the header
    assert 250 * 16 * 4 + 500 * 4 < path.stat().st_size < 250 * 16 * 4 + 500 * 4 + 1000
    table = load_sparse(path)["user"]
    mask = load_masks(art / "masks" / "final.safetensors")["user"]
    assert table.shape == (500, 16)
    assert torch.equal(table != 0, mask)
    emb = RemappedEmbedding.from_file(path, "user")
    ids = torch.arange(500)
    assert torch.equal(emb(ids), table)


def test_an_unknown_format_is_a_config_error(store, tmp_path):
    with pytest.raises(ConfigError, match=r"output.format=csr: .*dense.*bitmask.*rows"):
        run_overrides(["output.format=csr"], output_dir=tmp_path / "job")
