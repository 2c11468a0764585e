"""Sparse checkpoints: the sparse-bitmask and rows layouts round-trip to the dense squash."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sparsify_exp
from sparsify_exp import RemappedEmbedding, RowSparsifier, load_sparse, save_sparse
from sparsify_exp.sparse_format import bitmask_decode, bitmask_encode, load_compact_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(37,), (16, 21), (3, 4, 40)]


def _masked(shape, dtype, level, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(shape, generator=g).to(dtype)
    mask = torch.rand(shape, generator=g) >= level
    return data, mask, data * mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bitmask_round_trip_equals_the_squash(tmp_path, dtype, shape):
    _data, mask, squashed = _masked(shape, dtype, 0.6)
    bias = torch.randn(4).to(dtype)
    path = tmp_path / "m.safetensors"
    written = save_sparse({"a.weight": squashed, "a.bias": bias}, path, {"a.weight": mask})
    assert written == {"a.weight": "sparse-bitmask"}
    loaded = load_sparse(path)
    assert set(loaded) == {"a.weight", "a.bias"}
    assert loaded["a.weight"].dtype == dtype
    assert loaded["a.weight"].shape == torch.Size(shape)
    assert torch.equal(loaded["a.weight"], squashed)
    assert torch.equal(loaded["a.bias"], bias)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("a.compressed").numel() == int(mask.sum())
    assert keys == {"a.bias", "a.shape", "a.compressed", "a.bitmask", "a.row_offsets"}


def test_masks_given_with_the_original_data_still_write_the_squash(tmp_path):
    data, mask, squashed = _masked((40, 8), torch.float32, 0.02)  # nearly dense: stored dense
    path = tmp_path / "m.safetensors"
    assert save_sparse({"t": data}, path, {"t": mask}) == {"t": "dense"}
    assert torch.equal(load_sparse(path)["t"], squashed)


def test_the_layout_is_compressed_tensors_bitmask(tmp_path):
    """Keys, dtypes and bit order as compressed-tensors' BitmaskCompressor wrote them: numpy
    packbits along the last axis, little bit order; int64 shape and row offsets."""
    _data, mask, squashed = _masked((12, 19), torch.float32, 0.5, seed=3)
    parts = bitmask_encode(squashed, mask)
    ref = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert parts["bitmask"].dtype == torch.uint8
    assert np.array_equal(parts["bitmask"].numpy(), ref)
    assert parts["shape"].dtype == torch.int64 and parts["shape"].tolist() == [12, 19]
    counts = mask.sum(-1)
    assert torch.equal(parts["row_offsets"], torch.cumsum(counts, 0) - counts)
    assert torch.equal(parts["compressed"], squashed[mask])
    # their decompression: unpackbits(count=cols).reshape(shape), values scattered
    bits = np.unpackbits(parts["bitmask"].numpy(), axis=-1, count=19, bitorder="little")
    dense = torch.zeros(12, 19)
    dense[torch.from_numpy(bits.reshape(12, 19).astype(bool))] = parts["compressed"]
    assert torch.equal(dense, squashed)
    assert torch.equal(bitmask_decode(parts), squashed)


def test_a_file_compressed_tensors_wrote_loads_as_prefix_weight(tmp_path):
    _data, _mask, squashed = _masked((8, 16), torch.float16, 0.5)
    parts = bitmask_encode(squashed)  # by nonzero entries, no metadata of ours
    path = tmp_path / "ct.safetensors"
    save_file({f"layer.{k}": v for k, v in parts.items()}, str(path), metadata={"format": "pt"})
    assert torch.equal(load_sparse(path)["layer.weight"], squashed)


@pytest.mark.parametrize("kept", [False, True])
def test_all_removed_and_all_kept(tmp_path, kept):
    data = torch.randn(64, 32)
    mask = torch.full(data.shape, kept)
    path = tmp_path / "m.safetensors"
    written = save_sparse({"w": data * mask}, path, {"w": mask})
    # all kept: the encoding is larger than the tensor, which is then stored as it is
    assert written == {"w": "dense" if kept else "sparse-bitmask"}
    assert torch.equal(load_sparse(path)["w"], data * mask)
    if not kept:
        assert path.stat().st_size < 64 * 32 * 4 / 4


def test_names_without_weight_and_without_masks_and_ints(tmp_path):
    _data, mask, squashed = _masked((30, 6), torch.float32, 0.7)
    ids = torch.arange(5)
    path = tmp_path / "m.safetensors"
    save_sparse({"emb": squashed, "ids": ids}, path, {"emb": mask}, metadata={"note": "x"})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["note"] == "x"
    assert json.loads(meta["sparsify_exp.sparse"]) == {
        "emb": {"layout": "sparse-bitmask", "prefix": "emb"}
    }
    loaded = load_sparse(path)
    assert torch.equal(loaded["emb"], squashed)
    assert torch.equal(loaded["ids"], ids)


def test_masks_none_encodes_every_float_tensor_by_its_nonzeros(tmp_path):
    _, _, w = _masked((50, 20), torch.float32, 0.8)
    path = tmp_path / "m.safetensors"
    written = save_sparse({"w": w, "step": torch.tensor(3)}, path)
    assert written == {"w": "sparse-bitmask"}
    assert torch.equal(load_sparse(path)["w"], w)


def test_tied_tensors_are_written_once_each(tmp_path):
    shared = torch.randn(10, 4)
    path = tmp_path / "m.safetensors"
    save_sparse({"a": shared, "b": shared}, path, {})
    loaded = load_sparse(path)
    assert torch.equal(loaded["a"], shared) and torch.equal(loaded["b"], shared)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="layout='csr'"):
        save_sparse({"a": torch.ones(3)}, tmp_path / "x.safetensors", {}, layout="csr")
    with pytest.raises(KeyError, match="nope"):
        save_sparse({"a": torch.ones(3)}, tmp_path / "x.safetensors", {"nope": torch.ones(3)})
    with pytest.raises(ValueError, match="clash"):
        save_sparse(
            {"a.weight": torch.zeros(8, 8), "a.bitmask": torch.ones(2)},
            tmp_path / "x.safetensors",
            {"a.weight": torch.zeros(8, 8, dtype=torch.bool)},
        )
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_sparse(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_layout_from_a_row_sparsifier(tmp_path, dtype):
    table = torch.nn.Embedding(100, 16).to(dtype)
    with torch.no_grad():
        table.weight[3].zero_()  # a kept row that happens to be zero stays a kept row
    sp = RowSparsifier(sparsity_level=0.5)
    sp.add_data("user", table)
    sp.step()
    mask = sp.get_mask("user").clone()
    sp.squash_mask()
    dense = table.weight.detach().clone()
    bias = torch.randn(16, 16)
    bias_mask = torch.rand(16, 16) > 0.5  # not whole rows: written as a bitmask
    path = tmp_path / "rows.safetensors"
    written = save_sparse(
        {"user": dense, "other": bias * bias_mask},
        path,
        {"user": mask, "other": bias_mask},
        layout="rows",
    )
    assert written == {"user": "rows", "other": "sparse-bitmask"}
    loaded = load_sparse(path)
    assert torch.equal(loaded["user"], dense)
    assert torch.equal(loaded["other"], bias * bias_mask)
    rows, remap = load_compact_rows(path, "user")
    assert rows.shape == (50, 16) and remap.dtype == torch.int32
    assert int((remap == -1).sum()) == 50
    removed = torch.nonzero(remap == -1).squeeze(1)
    assert bool((dense[removed] == 0).all())


def test_remapped_embedding_reads_the_compact_rows_directly(tmp_path):
    table = torch.nn.EmbeddingBag(60, 8, mode="mean")
    sp = RowSparsifier(sparsity_level=0.7)
    sp.add_data("bag", table)
    sp.step()
    mask = sp.get_mask("bag").clone()
    sp.squash_mask()
    path = tmp_path / "rows.safetensors"
    save_sparse({"bag": table.weight.detach()}, path, {"bag": mask}, layout="rows")
    ids = torch.randint(0, 60, (40,))
    offsets = torch.arange(0, 40, 5)
    bag = RemappedEmbedding.from_file(path, "bag", mode="mean")
    assert bag.num_embeddings == 60 and bag.weight.shape == (18 + 1, 8)
    with torch.no_grad():
        assert torch.allclose(bag(ids, offsets), table(ids, offsets))
        lookup = RemappedEmbedding.from_file(path, "bag")
        assert torch.equal(lookup(ids), table.weight[ids])


def test_load_sparse_is_exported_and_reads_a_folder(tmp_path):
    assert sparsify_exp.load_sparse is load_sparse
    _, mask, w = _masked((9, 9), torch.float32, 0.5)
    save_sparse({"w": w}, tmp_path / "model.safetensors", {"w": mask})
    assert torch.equal(load_sparse(tmp_path)["w"], w)
