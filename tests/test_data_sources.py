"""Data sources: names, types, selection patterns, and writing back in the input's format."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsify_exp.runner.data import embeddings, file, model, select_names, tensors
from sparsify_exp.runner.data.mlp import MLP


def test_tensors_are_named_shaped_typed_and_seeded():
    specs = [{"name": "a.b", "shape": [3, 4]}, {"name": "c", "shape": [5]}]
    one = tensors.build(specs, dtype="bfloat16", seed=3)
    two = tensors.build(specs, dtype="bfloat16", seed=3)
    other = tensors.build(specs, dtype="bfloat16", seed=4)
    assert list(one.named_data) == ["a.b", "c"]
    assert one.named_data["a.b"].shape == (3, 4) and one.named_data["c"].dtype == torch.bfloat16
    assert torch.equal(one.named_data["a.b"], two.named_data["a.b"])
    assert not torch.equal(one.named_data["a.b"], other.named_data["a.b"])
    assert tensors.build(specs, init="uniform").named_data["c"].min() >= 0


def test_model_source_selects_parameters_by_pattern():
    b = model.build(MLP([8, 4, 2]), include=["net.*"], exclude=["*.bias"])
    assert list(b.named_data) == ["net.0.weight", "net.2.weight"]
    assert all(isinstance(p, nn.Parameter) for p in b.named_data.values())
    assert set(b.tensors()) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    built = model.build({"_target_": "sparsify_exp.runner.data.mlp.MLP", "sizes": [3, 2]}, seed=1)
    again = model.build({"_target_": "sparsify_exp.runner.data.mlp.MLP", "sizes": [3, 2]}, seed=1)
    assert torch.equal(built.named_data["net.0.weight"], again.named_data["net.0.weight"])
    with pytest.raises(ValueError, match="select no parameter"):
        model.build(MLP([3, 2]), include=["encoder.*"])


def test_embeddings_source_builds_both_table_kinds():
    b = embeddings.build(
        [
            {"name": "t.user", "kind": "embedding", "num_embeddings": 10, "embedding_dim": 4},
            {
                "name": "t.item",
                "kind": "embedding_bag",
                "num_embeddings": 7,
                "embedding_dim": 3,
                "mode": "mean",
            },
        ]
    )
    assert type(b.named_data["t.user"]) is nn.Embedding
    bag = b.named_data["t.item"]
    assert type(bag) is nn.EmbeddingBag and bag.mode == "mean" and bag.weight.shape == (7, 3)


def test_file_source_safetensors_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(
        {"l.weight": torch.randn(4, 4), "l.bias": torch.randn(4), "n": torch.tensor([1])},
        str(path),
        metadata={"k": "v"},
    )
    assert file.list_names(path) == ["l.bias", "l.weight"]
    b = file.build(str(path), exclude=["*.bias"])
    assert list(b.named_data) == ["l.weight"] and b.format == "safetensors"
    b.named_data["l.weight"].zero_()
    out = b.save(tmp_path / "out")
    assert out.suffix == ".safetensors"
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == {"l.weight", "l.bias", "n"}
        assert f.metadata() == {"k": "v"}
        assert (f.get_tensor("l.weight") == 0).all() and (f.get_tensor("l.bias") != 0).all()


def test_file_source_torch_nested_state_dict(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"enc.w": torch.randn(3, 3)}, "epoch": 4}, path)
    b = file.build(str(path))
    assert list(b.named_data) == ["state_dict.enc.w"] and b.format == "torch"
    b.named_data["state_dict.enc.w"].zero_()
    out = torch.load(b.save(tmp_path / "out"), weights_only=True)
    assert out["epoch"] == 4 and (out["state_dict"]["enc.w"] == 0).all()


def test_file_source_refuses_pickled_objects_clearly(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"model": MLP([2, 2])}, path)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        file.build(str(path))


def test_select_names_globs():
    names = ["a.weight", "a.bias", "b.weight"]
    assert select_names(names, None, None) == names
    assert select_names(names, ["a.*"], None) == ["a.weight", "a.bias"]
    assert select_names(names, ["*"], ["*.bias"]) == ["a.weight", "b.weight"]


def test_torch_file_holding_a_bare_tensor_is_named_by_its_stem(tmp_path):
    path = tmp_path / "user_table.pt"
    torch.save(torch.randn(6, 4), path)
    b = file.build(str(path))
    assert list(b.named_data) == ["user_table"]
    b.named_data["user_table"].zero_()
    out = b.save(tmp_path / "out")
    assert torch.equal(torch.load(out, weights_only=True), torch.zeros(6, 4))
