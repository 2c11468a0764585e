"""Sparse + quantized embedding tables: ``post_training_sparse_quantize`` against torch's own,
and the runner's ``output.quantize`` size."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.pruning._experimental.data_sparsifier import (
    DataNormSparsifier as TorchDataNormSparsifier,
)
from torch.ao.pruning._experimental.data_sparsifier.quantization_utils import (
    post_training_sparse_quantize as torch_ptsq,
)

import sparsify_exp
from sparsify_exp import (
    DataNormSparsifier,
    FirstRowSparsifier,
    MagnitudeSparsifier,
    NMSparsifier,
    RandomSparsifier,
    RowSparsifier,
    post_training_sparse_quantize,
)
from sparsify_exp.quantize import (
    QPARAM_BYTES_PER_ROW,
    quantize_embedding,
    sparse_quantized_nbytes,
)
from sparsify_exp.sparsifier.mask_bits import packed_nbytes

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore:.*deprecated:UserWarning"
)

CONFIG = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "zeros_per_block": 4}


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.bag = nn.EmbeddingBag(12, 12, mode="mean")


class Model(nn.Module):
    """Nested tables (dotted names ``inner.emb``, ``inner.bag``), a top-level one, a Linear."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inner = Inner()
        self.top = nn.Embedding(7, 16)
        self.lin = nn.Linear(3, 3)


TABLES = ("inner.emb", "inner.bag", "top")


def _qweights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight() for n in TABLES}


@pytest.mark.parametrize("sparsify_first", [True, False])
def test_same_quantized_tables_as_torch(sparsify_first):
    """Random normal weights have no ties in block norms: both pick the same blocks."""
    ours, theirs = Model(), Model()
    post_training_sparse_quantize(ours, DataNormSparsifier, sparsify_first, **CONFIG)
    torch_ptsq(theirs, TorchDataNormSparsifier, sparsify_first, **CONFIG)
    for name in TABLES:
        assert type(ours.get_submodule(name)) is type(theirs.get_submodule(name))
    assert type(ours.inner.emb) is nnq.Embedding and type(ours.inner.bag) is nnq.EmbeddingBag
    assert type(ours.lin) is nn.Linear
    for name, q in _qweights(ours).items():
        t = theirs.get_submodule(name).weight()
        assert torch.equal(q.int_repr(), t.int_repr()), name
        assert torch.equal(q.q_per_channel_scales(), t.q_per_channel_scales()), name
        assert torch.equal(q.q_per_channel_zero_points(), t.q_per_channel_zero_points()), name
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(ours.inner.bag(idx), theirs.inner.bag(idx))


@pytest.mark.parametrize("sparsify_first", [True, False])
def test_pruned_entries_dequantize_near_zero(sparsify_first):
    model, dense = Model(), Model()
    post_training_sparse_quantize(model, DataNormSparsifier, sparsify_first, **CONFIG)
    for name in TABLES:
        q = model.get_submodule(name).weight()
        d = q.dequantize()
        scale = q.q_per_channel_scales().float().unsqueeze(1)
        near_zero = d.abs() <= scale / 2 + 1e-6
        # half the 4-wide blocks (by norm) were zeroed in every table
        assert near_zero.sum() >= d.numel() // 2, name
        original = dense.get_submodule(name).weight.detach()
        assert (original.abs() > scale).sum() > (d.abs() > scale).sum()


@pytest.mark.parametrize(
    "cls",
    [
        DataNormSparsifier,
        MagnitudeSparsifier,
        NMSparsifier,
        RandomSparsifier,
        RowSparsifier,
        FirstRowSparsifier,
        TorchDataNormSparsifier,
    ],
)
def test_every_sparsifier(cls):
    model = Model()
    post_training_sparse_quantize(model, cls)
    assert [type(model.get_submodule(n)) for n in TABLES] == [
        nnq.Embedding,
        nnq.EmbeddingBag,
        nnq.Embedding,
    ]


def test_select_embeddings_by_module_or_name():
    model = Model()
    post_training_sparse_quantize(model, DataNormSparsifier, select_embeddings=[model.inner.bag])
    assert type(model.inner.bag) is nnq.EmbeddingBag
    assert type(model.inner.emb) is nn.Embedding and type(model.top) is nn.Embedding
    model = Model()
    post_training_sparse_quantize(
        model, DataNormSparsifier, False, select_embeddings=["inner.emb", "top"]
    )
    assert type(model.inner.emb) is nnq.Embedding and type(model.top) is nnq.Embedding
    assert type(model.inner.bag) is nn.EmbeddingBag


def test_a_non_embedding_selection_is_a_value_error_naming_it():
    model = Model()
    with pytest.raises(ValueError, match=r"'lin' is a Linear, not an nn.Embedding"):
        post_training_sparse_quantize(model, DataNormSparsifier, select_embeddings=["lin"])
    with pytest.raises(ValueError, match=r"'inner' is a Inner"):
        post_training_sparse_quantize(model, DataNormSparsifier, select_embeddings=[model.inner])
    with pytest.raises(ValueError, match=r"no module 'inner.nope'"):
        post_training_sparse_quantize(model, DataNormSparsifier, select_embeddings=["inner.nope"])
    with pytest.raises(ValueError, match="not part of the model"):
        post_training_sparse_quantize(
            model, DataNormSparsifier, select_embeddings=[nn.Embedding(3, 4)]
        )
    with pytest.raises(TypeError, match="must be a list"):
        post_training_sparse_quantize(model, DataNormSparsifier, select_embeddings="top")
    assert type(model.top) is nn.Embedding  # nothing was changed


@pytest.mark.parametrize("cls", [MagnitudeSparsifier, TorchDataNormSparsifier])
def test_names_that_torch_would_merge_stay_apart(cls):
    """torch names data ``fqn.replace('.', '_')``: ``a.b_c`` and ``a_b.c`` would be one name
    and only the last added would be sparsified."""
    model = nn.Module()
    model.a = nn.Module()
    model.a.b_c = nn.Embedding(6, 8)
    model.a_b = nn.Module()
    model.a_b.c = nn.Embedding(6, 8)
    post_training_sparse_quantize(model, cls, sparsity_level=0.5)
    for name in ("a.b_c", "a_b.c"):
        q = model.get_submodule(name).weight()
        d, scale = q.dequantize(), q.q_per_channel_scales().float().unsqueeze(1)
        assert (d.abs() <= scale / 2 + 1e-6).sum() >= d.numel() // 2, name


def test_other_modules_with_a_qconfig_are_left_alone():
    model = Model()
    model.lin.qconfig = torch.ao.quantization.default_qconfig
    post_training_sparse_quantize(model, DataNormSparsifier)
    assert type(model.lin) is nn.Linear
    assert type(model.top) is nnq.Embedding


def test_quantize_embedding_is_a_copy_with_torchs_packed_row_layout():
    emb = nn.EmbeddingBag(5, 12)
    before = emb.weight.detach().clone()
    q = quantize_embedding(emb)
    assert type(q) is nnq.EmbeddingBag and torch.equal(emb.weight, before)
    assert not hasattr(emb, "qconfig")
    # torch's packed uint8 rows: the values, then an fp32 scale and an fp32 offset
    packed = torch.ops.quantized.embedding_bag_byte_prepack(before)
    assert packed.shape == (5, 12 + QPARAM_BYTES_PER_ROW) and packed.dtype == torch.uint8
    with pytest.raises(ValueError, match="Linear"):
        quantize_embedding(nn.Linear(2, 2))


def test_sparse_quantized_nbytes():
    assert sparse_quantized_nbytes(64, 4, 10) == packed_nbytes(64) + 10 + 4 * 8
    assert sparse_quantized_nbytes(64, 4, 64) == 64 + 4 * 8  # dense: plain uint8 is smaller


def test_exported():
    assert "post_training_sparse_quantize" in sparsify_exp.__all__
    assert sparsify_exp.post_training_sparse_quantize is post_training_sparse_quantize


# ------------------------------------------------------------------ the runner


def test_runner_logs_the_sparse_quantized_size(store, tmp_path):
    import csv

    from sparsify_exp.runner import run_overrides

    rid = run_overrides(
        ["data=embeddings", "output.quantize=true", "eval=[]", "mlflow.mask_images=0"],
        output_dir=tmp_path / "job",
    )
    metrics = store.client.get_run(rid).data.metrics
    quantized = metrics["size/quantized_bytes"]
    assert quantized < metrics["size/compressed_bytes"] < metrics["size/dense_bytes"]
    with (tmp_path / "job" / "artifacts" / "per_name.csv").open() as f:
        rows = list(csv.DictReader(f))
    expected = 0
    for row in rows:
        numel, (n_rows, _) = int(row["numel"]), map(int, row["shape"].split("x"))
        kept = numel - round(float(row["sparsity"]) * numel)
        expected += sparse_quantized_nbytes(numel, n_rows, kept)
    assert {r["kind"] for r in rows} == {"embedding", "embedding_bag"}
    assert abs(quantized - expected) <= 1e-6 * expected + len(rows)
    # the default half-sparse tables: a bit + a byte per two entries + 8 bytes a row
    dense = metrics["size/dense_bytes"]
    assert quantized < dense / 4


def test_runner_quantize_needs_embedding_tables(store, tmp_path):
    from sparsify_exp.runner import compose_config, run_overrides
    from sparsify_exp.runner.validate import validate

    # a source that never has tables: a config error, before any run
    (problem,) = validate(compose_config(["data=tensors", "output.quantize=true"]))
    assert problem.startswith("output.quantize=true: the data (tensors) has no embedding tables")
    # a model's tables are known once it is built: the run fails with the reason
    with pytest.raises(RuntimeError, match=r"output.quantize=true: the data has no embedding"):
        run_overrides(
            ["data=model", "output.quantize=true", "eval=[]", "mlflow.mask_images=0"],
            output_dir=tmp_path / "job",
        )
    (run,) = store.runs()
    assert run.info.status == "FAILED"


def test_quantize_is_off_by_default(store, tmp_path):
    from sparsify_exp.runner import run_overrides

    rid = run_overrides(
        ["data=embeddings", "eval=[]", "mlflow.mask_images=0"], output_dir=tmp_path / "job"
    )
    assert "size/quantized_bytes" not in store.client.get_run(rid).data.metrics
