"""load_state_dict checks everything it loads, names the bad key, and changes nothing on error.

Before these checks, a mask of the wrong shape (or data swapped for another shape) loaded
and failed later, in step() or squash_mask(), far from the checkpoint that caused it.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.data_sparsifier import (
    DataNormSparsifier as RefDataNorm,
)

from sparsify_exp import DataNormSparsifier, FirstRowSparsifier
from sparsify_exp.sparsifier import pack_mask

PARAM = "parametrizations.{}.original"


def _stepped(sparsifier_cls=DataNormSparsifier) -> DataNormSparsifier:
    torch.manual_seed(0)
    sp = sparsifier_cls(sparsity_level=0.5)
    sp.add_data("emb", torch.randn(10, 8))
    sp.add_data("enc.bias", torch.randn(12))
    sp.add_data("sq", torch.randn(4, 6))
    sp.step()
    sp.squash_mask(names=["sq"])
    return sp


def _snapshot(sp) -> dict:
    """What a rejected load must leave alone: names, configs, mask objects and values, data."""
    return {
        "names": list(sp.data_groups),
        "configs": copy.deepcopy(sp.data_groups),
        "masks": {n: (sp.get_mask(n), sp.get_mask(n).clone()) for n in sp.data_groups},
        "data": {n: sp.get_data(n, return_original=False).detach().clone() for n in sp.data_groups},
        "live": {n: sp.get_data(n) for n in sp.data_groups if not sp.is_squashed(n)},
    }


def _assert_unchanged(sp, snap: dict) -> None:
    assert list(sp.data_groups) == snap["names"]
    assert sp.data_groups == snap["configs"]
    for name, (mask, values) in snap["masks"].items():
        assert sp.get_mask(name) is mask
        assert torch.equal(mask, values)
        assert torch.equal(sp.get_data(name, return_original=False), snap["data"][name])
    for name, data in snap["live"].items():
        assert sp.get_data(name) is data
    sp.step()  # still usable


def _load_fails(sd: dict, match: str) -> None:
    """Loading ``sd`` raises ValueError matching ``match`` and leaves a populated
    sparsifier unchanged, in both strict modes."""
    for strict in (True, False):
        target = _stepped()
        target.add_data("other", torch.randn(3, 4))
        snap = _snapshot(target)
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(sd, strict=strict)
        _assert_unchanged(target, snap)


# ------------------------------------------------------------------------- mask shapes


def test_packed_mask_of_another_shape_is_rejected_naming_the_key():
    sd = _stepped().state_dict()
    sd["state"]["emb"]["mask"] = pack_mask(torch.ones(10, 4, dtype=torch.bool))
    sd["state"]["emb"]["mask_shape"] = (10, 4)
    message = (
        "state_dict['state']['emb']['mask']: shape (10, 4) does not match data 'emb' "
        "of shape (10, 8)"
    )
    _load_fails(sd, f"^{re.escape(message)}$")


def test_data_swapped_for_another_shape_is_rejected():
    sd = _stepped().state_dict()
    sd["_container"][PARAM.format("emb")] = torch.randn(10, 4)
    message = (
        "state_dict['state']['emb']['mask']: shape (10, 8) does not match data 'emb' "
        "of shape (10, 4)"
    )
    _load_fails(sd, f"^{re.escape(message)}$")


def test_squashed_data_swapped_for_another_shape_is_rejected():
    sd = _stepped().state_dict()
    sd["_container"]["sq"] = torch.randn(6, 4)
    _load_fails(sd, re.escape("['sq']['mask']: shape (4, 6) does not match data 'sq'"))


@pytest.mark.parametrize("layout", ["dense", "sparse_coo"])
def test_reference_style_mask_of_another_shape_is_rejected(layout):
    sd = _stepped().state_dict()
    mask = torch.ones(10, 4, dtype=torch.int8)
    sd["state"]["emb"] = {"mask": mask if layout == "dense" else mask.to_sparse_coo()}
    _load_fails(sd, re.escape("state_dict['state']['emb']['mask']: shape (10, 4)"))


def test_mask_of_the_same_numel_but_another_layout_of_dims_is_rejected():
    """Only size-1 dims may differ (torch's reference's (1, N) masks): (8, 10) != (10, 8)."""
    sd = _stepped().state_dict()
    sd["state"]["emb"] = {"mask": torch.ones(8, 10)}
    _load_fails(sd, re.escape("shape (8, 10) does not match data 'emb' of shape (10, 8)"))


def test_packed_mask_with_the_wrong_byte_count_is_rejected():
    sd = _stepped().state_dict()
    sd["state"]["emb"]["mask"] = sd["state"]["emb"]["mask"][:-1]
    _load_fails(sd, re.escape("state_dict['state']['emb']['mask']: packed mask must be"))


@pytest.mark.parametrize("bad", [(10, -8), "10x8", (10.0, 8), None])
def test_malformed_mask_shape_is_rejected(bad):
    sd = _stepped().state_dict()
    sd["state"]["emb"]["mask_shape"] = bad
    if bad is None:  # no shape: the packed bytes are read as a dense mask of 10 entries
        _load_fails(sd, re.escape("state_dict['state']['emb']['mask']: shape (10,)"))
    else:
        _load_fails(sd, re.escape("state_dict['state']['emb']['mask_shape']: must be"))


# --------------------------------------------------------------------------- mask dtypes


def test_packed_mask_of_another_dtype_is_rejected():
    sd = _stepped().state_dict()
    sd["state"]["emb"]["mask"] = sd["state"]["emb"]["mask"].float()
    _load_fails(sd, re.escape("state_dict['state']['emb']['mask']: packed mask must be"))


def test_complex_mask_is_rejected():
    sd = _stepped().state_dict()
    sd["state"]["emb"] = {"mask": torch.ones(10, 8, dtype=torch.complex64)}
    _load_fails(sd, re.escape("['emb']['mask']: dtype torch.complex64 is not a mask dtype"))


def test_mask_that_is_not_a_tensor_is_rejected():
    sd = _stepped().state_dict()
    sd["state"]["emb"] = {"mask": [[1] * 8] * 10}
    _load_fails(sd, re.escape("state_dict['state']['emb']['mask']: must be a tensor; got list"))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.uint8, torch.float32])
def test_dense_masks_of_any_real_dtype_load_as_bool(dtype):
    sp = _stepped()
    expected = sp.get_mask("emb").clone()
    sd = sp.state_dict()
    sd["state"]["emb"] = {"mask": expected.to(dtype)}
    fresh = DataNormSparsifier()
    fresh.load_state_dict(sd)
    assert fresh.get_mask("emb").dtype == torch.bool
    assert torch.equal(fresh.get_mask("emb"), expected)


def test_loaded_dense_mask_does_not_alias_the_state_dict():
    sp = _stepped()
    sd = sp.state_dict()
    given = sp.get_mask("emb").clone()
    sd["state"]["emb"] = {"mask": given}
    fresh = DataNormSparsifier()
    fresh.load_state_dict(sd)
    given.fill_(False)
    assert torch.equal(fresh.get_mask("emb"), sp.get_mask("emb"))


# ------------------------------------------------------------------------------ key sets


def test_data_group_without_state_is_rejected():
    sd = _stepped().state_dict()
    sd["data_groups"]["ghost"] = {"sparsity_level": 0.5}
    _load_fails(sd, re.escape("state_dict['data_groups']['ghost']: has no state"))


def test_state_without_data_group_is_rejected():
    sd = _stepped().state_dict()
    del sd["data_groups"]["emb"]
    _load_fails(sd, re.escape("state_dict['state']['emb']: 'emb' has no entry in"))


def test_state_without_data_is_rejected():
    sd = _stepped().state_dict()
    del sd["_container"][PARAM.format("emb")]
    _load_fails(sd, re.escape("state_dict['_container']: no data for 'emb'"))


def test_container_key_of_no_name_is_rejected():
    sd = _stepped().state_dict()
    sd["_container"][PARAM.format("ghost")] = torch.randn(2, 2)
    _load_fails(sd, re.escape("state_dict['_container']['parametrizations.ghost.original']"))


@pytest.mark.parametrize(
    "bad", [[1.0, 2.0], torch.randn(10, 8).to_sparse_coo()], ids=["list", "sparse"]
)
def test_data_that_is_not_a_dense_tensor_is_rejected(bad):
    sd = _stepped().state_dict()
    sd["_container"][PARAM.format("emb")] = bad
    _load_fails(sd, re.escape("state_dict['_container']['parametrizations.emb.original']"))


@pytest.mark.parametrize("part", ["state", "data_groups", "_container"])
def test_parts_that_are_not_dicts_are_rejected(part):
    sd = _stepped().state_dict()
    sd[part] = [1, 2]
    _load_fails(sd, re.escape(f"state_dict[{part!r}]: must be a dict"))


def test_state_entry_that_is_not_a_dict_is_rejected():
    sd = _stepped().state_dict()
    sd["state"]["emb"] = torch.ones(10, 8)
    _load_fails(sd, re.escape("state_dict['state']['emb']: must be a dict"))


def test_missing_top_level_keys_are_rejected():
    sd = _stepped().state_dict()
    del sd["_container"]
    _load_fails(sd, "missing")


# ------------------------------------------------------------------------------ configs


def test_bad_config_is_rejected_at_load_not_at_step():
    sd = _stepped().state_dict()
    sd["data_groups"]["emb"]["sparsity_level"] = 1.5
    _load_fails(sd, re.escape("state_dict['data_groups']['emb']: ") + ".*sparsity_level")


def test_configs_are_normalised_as_add_data_does():
    sd = _stepped().state_dict()
    sd["data_groups"]["emb"]["sparse_block_shape"] = [2, 2]
    sd["data_groups"]["emb"]["zeros_per_block"] = None
    fresh = DataNormSparsifier()
    fresh.load_state_dict(sd)
    assert fresh.data_groups["emb"]["sparse_block_shape"] == (2, 2)
    assert fresh.data_groups["emb"]["zeros_per_block"] == 4


# ------------------------------------------------------------------------ many problems


def test_every_problem_is_reported_in_one_error():
    sd = _stepped().state_dict()
    sd["state"]["emb"]["mask_shape"] = (8, 10)
    sd["_container"]["sq"] = torch.randn(1)
    sd["data_groups"]["enc.bias"]["norm"] = "L1"  # unknown keys are fine: not a problem
    sd["data_groups"]["enc.bias"]["sparsity_level"] = -1
    with pytest.raises(ValueError) as info:
        DataNormSparsifier().load_state_dict(sd)
    message = str(info.value)
    assert message.startswith("cannot load state_dict, 3 problems: ")
    for key in (
        "state_dict['state']['emb']['mask']: shape (8, 10)",
        "state_dict['state']['sq']['mask']: shape (4, 6) does not match data 'sq' of shape (1,)",
        "state_dict['data_groups']['enc.bias']: ",
    ):
        assert key in message


def test_a_rejected_load_leaves_a_fresh_sparsifier_empty():
    sd = _stepped().state_dict()
    sd["_container"][PARAM.format("emb")] = torch.randn(3)
    fresh = DataNormSparsifier()
    with pytest.raises(ValueError):
        fresh.load_state_dict(sd)
    assert not fresh.data_groups and not fresh.state


# ---------------------------------------------------------------- what must keep loading


@pytest.mark.parametrize("cls", [DataNormSparsifier, FirstRowSparsifier])
def test_own_state_dicts_still_load_and_step(cls, tmp_path):
    sp = _stepped(cls)
    path = tmp_path / "sd.pt"
    torch.save(sp.state_dict(), path)
    fresh = cls()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for name in sp.data_groups:
        assert torch.equal(fresh.get_mask(name), sp.get_mask(name))
        assert fresh.is_squashed(name) == sp.is_squashed(name)
    fresh.step()
    sp.step()
    for name in sp.data_groups:
        assert torch.equal(fresh.get_mask(name), sp.get_mask(name))


def test_torch_reference_checkpoints_load_including_1d_and_squashed_data(tmp_path):
    """The reference writes (1, N) masks for 1-D data and keeps squashed data under its
    name; both load, and ours then steps and squashes them."""
    torch.manual_seed(3)
    ref = RefDataNorm(sparsity_level=0.5)
    ref.add_data("w", torch.randn(8, 12))
    ref.add_data("bias", torch.randn(12))
    ref.add_data("emb", nn.Embedding(10, 4))
    ref.step()
    ref.squash_mask(names=["w"])
    path = tmp_path / "ref.pt"
    torch.save(ref.state_dict(), path)
    sd = torch.load(path, weights_only=False)  # the reference's holds a defaultdict
    assert tuple(sd["state"]["bias"]["mask"].shape) == (1, 12)  # what the reference writes
    assert "w" in sd["_container"]

    ours = DataNormSparsifier()
    ours.load_state_dict(sd)
    for name in ("w", "bias", "emb"):
        expected = (ref.get_mask(name) != 0).reshape(ours.get_data(name, False).shape)
        assert torch.equal(ours.get_mask(name), expected), name
    assert ours.get_mask("bias").shape == (12,)
    assert ours.is_squashed("w") and not ours.is_squashed("bias")
    ours.step()
    assert int((~ours.get_mask("bias")).sum()) == 8  # round(0.5 * 3 blocks) * 4
    ours.squash_mask()
    assert torch.equal(ours.get_data("bias", return_original=False) == 0, ~ours.get_mask("bias"))
