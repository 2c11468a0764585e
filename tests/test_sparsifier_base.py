"""BaseDataSparsifier: registration by reference, masks, squash, checkpoints, copies, names."""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
from torch import nn

from sparsify_exp import BaseDataSparsifier, DataNormSparsifier, FirstRowSparsifier
from sparsify_exp.sparsifier.base import SUPPORTED_TYPES


class Recording(BaseDataSparsifier):
    """Records every update_mask call; zeroes the entries below ``threshold``."""

    def __init__(self, data_list=None, **defaults):
        super().__init__(data_list=data_list, **defaults)
        self.calls = []

    def update_mask(self, name, data, **config):
        self.calls.append(
            dict(
                name=name,
                ptr=data.data_ptr(),
                config=dict(config),
                grad=torch.is_grad_enabled(),
            )
        )
        mask = self.get_mask(name)
        mask.copy_(data.abs() >= config.get("threshold", 0.0))


def _make(kind: str):
    """(object to add, the tensor it holds)."""
    torch.manual_seed(0)
    if kind == "tensor":
        t = torch.randn(6, 5)
        return t, t
    if kind == "parameter":
        p = nn.Parameter(torch.randn(6, 5))
        return p, p
    if kind == "embedding":
        e = nn.Embedding(6, 5)
        return e, e.weight
    if kind == "embedding_bag":
        e = nn.EmbeddingBag(6, 5)
        return e, e.weight
    raise AssertionError(kind)


KINDS = ["tensor", "parameter", "embedding", "embedding_bag"]


# ----------------------------------------------------------------------------- add_data


@pytest.mark.parametrize("kind", KINDS)
def test_add_data_registers_by_reference(kind):
    obj, tensor = _make(kind)
    original = tensor.detach().clone()
    sp = FirstRowSparsifier()
    returned = sp.add_data("d", obj)
    assert sp.get_data("d").data_ptr() == tensor.data_ptr()
    assert sp.get_data("d") is tensor
    assert returned is tensor  # the registered tensor: the user's own
    mask = sp.get_mask("d")
    assert mask.shape == tensor.shape and mask.all()
    sp.step()
    assert torch.equal(tensor.detach(), original)  # stepping leaves the data alone
    sp.squash_mask()
    assert tensor.data_ptr() == sp.get_data("d", return_original=False).data_ptr()
    expected = original.clone()
    expected[0] = 0
    assert torch.equal(tensor.detach(), expected)  # the user's own tensor changed in place
    if kind in ("embedding", "embedding_bag"):
        assert obj.weight is tensor
        out = obj(torch.tensor([[0, 1]])) if kind == "embedding" else obj(torch.tensor([[0]]))
        assert torch.all(out == 0) if kind == "embedding_bag" else torch.all(out[0, 0] == 0)


def test_parameter_keeps_requires_grad_and_squash_works_without_grad_errors():
    p = nn.Parameter(torch.randn(4, 4))
    sp = FirstRowSparsifier()
    sp.add_data("p", p)
    sp.step()
    sp.squash_mask()
    assert p.requires_grad
    assert torch.all(p[0] == 0)
    assert isinstance(sp.get_data("p", return_original=False), nn.Parameter)


def test_data_list_in_constructor_and_defaults_in_data_groups():
    a, b = torch.randn(3, 3), torch.randn(2, 2)
    sp = Recording(data_list=[("a", a), ("b", b)], threshold=0.5, other="x")
    assert list(sp.data_groups) == ["a", "b"]
    assert sp.data_groups["a"] == {"threshold": 0.5, "other": "x"}
    assert sp.get_data("a") is a


def test_per_name_config_merged_over_defaults():
    sp = Recording(threshold=0.5, other="x")
    sp.add_data("a", torch.randn(3, 3))
    sp.add_data("b", torch.randn(3, 3), threshold=0.1, extra=3)
    assert sp.data_groups["a"] == {"threshold": 0.5, "other": "x"}
    assert sp.data_groups["b"] == {"threshold": 0.1, "other": "x", "extra": 3}
    assert sp.defaults == {"threshold": 0.5, "other": "x"}  # defaults untouched


def test_defaults_are_not_shared_between_names():
    sp = Recording(lst=[1])
    sp.add_data("a", torch.randn(2))
    sp.add_data("b", torch.randn(2))
    sp.data_groups["a"]["lst"].append(2)
    assert sp.data_groups["b"]["lst"] == [1]
    assert sp.defaults["lst"] == [1]


def test_re_add_warns_merges_config_and_reuses_mask():
    t = torch.randn(4, 4)
    sp = Recording(threshold=0.5, other="x")
    sp.add_data("a", t, threshold=0.1, extra=1)
    mask = sp.get_mask("a")
    mask[1] = False
    t2 = torch.randn(4, 4)
    with pytest.warns(UserWarning, match="'a'"):
        sp.add_data("a", t2, extra=2)
    assert sp.data_groups["a"] == {"threshold": 0.1, "other": "x", "extra": 2}
    assert sp.get_mask("a") is mask
    assert not sp.get_mask("a")[1].any()
    assert sp.get_data("a") is t2
    sp.squash_mask()
    assert torch.all(t2[1] == 0)
    assert not torch.any(t == 0)  # the replaced tensor is not touched any more


def test_re_add_without_reuse_gives_a_fresh_mask():
    t = torch.randn(4, 4)
    sp = Recording()
    sp.add_data("a", t)
    mask = sp.get_mask("a")
    mask.fill_(False)
    with pytest.warns(UserWarning):
        sp.add_data("a", t, reuse_mask=False)
    assert sp.get_mask("a") is not mask
    assert sp.get_mask("a").all()


def test_re_add_with_different_shape_raises_and_keeps_old_data():
    t = torch.randn(4, 4)
    sp = Recording()
    sp.add_data("a", t)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="shape"):
        sp.add_data("a", torch.randn(4, 5))
    assert sp.get_data("a") is t
    # a new shape is fine with a new mask
    with pytest.warns(UserWarning):
        sp.add_data("a", torch.randn(4, 5), reuse_mask=False)
    assert sp.get_mask("a").shape == (4, 5)


def test_initial_mask_in_config():
    t = torch.randn(3, 4)
    sp = Recording()
    sp.add_data("a", t, mask=torch.tensor([[1.0, 0, 1, 0]] * 3))
    assert sp.get_mask("a").dtype == torch.bool
    assert torch.equal(sp.get_data("a", return_original=False)[:, 1], torch.zeros(3))
    assert "mask" not in sp.data_groups["a"]
    with pytest.raises(ValueError):
        sp.add_data("b", t, mask=torch.ones(2, 2))


@pytest.mark.parametrize(
    "bad",
    [
        [1.0, 2.0],
        (1, 2),
        3.0,
        None,
        nn.Linear(2, 2),
        torch.eye(3).to_sparse(),
    ],
    ids=["list", "tuple", "float", "none", "linear", "sparse"],
)
def test_unsupported_type_raises_type_error(bad):
    sp = Recording()
    with pytest.raises(TypeError):
        sp.add_data("x", bad)
    assert "x" not in sp.data_groups


def test_supported_types_listed():
    for cls in (torch.Tensor, nn.Parameter, nn.Embedding, nn.EmbeddingBag):
        assert cls in SUPPORTED_TYPES


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_names_raise(name):
    with pytest.raises((ValueError, TypeError)):
        Recording().add_data(name, torch.randn(2))


# ------------------------------------------------------------------------------ step


def test_step_calls_update_mask_for_every_name_under_no_grad_with_merged_config():
    a = nn.Parameter(torch.randn(4, 4))
    b = torch.randn(3)
    e = nn.EmbeddingBag(5, 2)
    sp = Recording(threshold=0.5)
    sp.add_data("a", a)
    sp.add_data("b", b, threshold=0.1, tag="bias")
    sp.add_data("e", e)
    assert torch.is_grad_enabled()
    sp.step()
    assert [c["name"] for c in sp.calls] == ["a", "b", "e"]
    assert [c["ptr"] for c in sp.calls] == [a.data_ptr(), b.data_ptr(), e.weight.data_ptr()]
    assert all(c["grad"] is False for c in sp.calls)
    assert sp.calls[0]["config"] == {"threshold": 0.5}
    assert sp.calls[1]["config"] == {"threshold": 0.1, "tag": "bias"}
    assert torch.equal(sp.get_mask("a"), a.detach().abs() >= 0.5)


def test_step_sees_unmasked_data():
    t = torch.ones(3, 3)
    seen = []

    class Spy(BaseDataSparsifier):
        def update_mask(self, name, data, **config):
            seen.append(data.clone())
            self.get_mask(name)[0] = False

    sp = Spy()
    sp.add_data("t", t)
    sp.step()
    sp.step()
    assert torch.equal(seen[1], torch.ones(3, 3))  # the original, not the masked view


def test_enable_mask_update_false_skips_step():
    sp = Recording()
    sp.add_data("a", torch.randn(2, 2))
    sp.enable_mask_update = False
    sp.step()
    assert sp.calls == []


def test_update_mask_is_abstract():
    with pytest.raises(TypeError):
        BaseDataSparsifier()  # type: ignore[abstract]


def test_first_row_sparsifier():
    w, bias = torch.randn(4, 3), torch.randn(5)
    sp = FirstRowSparsifier()
    sp.add_data("w", w)
    sp.add_data("bias", bias)
    sp.step()
    assert torch.equal(sp.get_mask("w")[0], torch.zeros(3, dtype=torch.bool))
    assert sp.get_mask("w")[1:].all()
    assert not sp.get_mask("bias")[0] and sp.get_mask("bias")[1:].all()


# --------------------------------------------------------------------- get_mask / get_data


def test_get_data_original_and_masked():
    t = torch.randn(4, 3)
    sp = FirstRowSparsifier()
    sp.add_data("t", t)
    sp.step()
    assert sp.get_data("t") is t
    assert sp.get_data("t", return_original=True) is t
    masked = sp.get_data("t", return_original=False)
    expected = t.clone()
    expected[0] = 0
    assert torch.equal(masked, expected)
    assert torch.equal(t[0], t.clone()[0]) and t[0].abs().sum() > 0


def test_in_place_idiom_slice_assign():
    torch.manual_seed(1)
    t = torch.randn(16, 10)
    original = t.clone()
    sp = FirstRowSparsifier()
    sp.add_data("t", t)
    mask = sp.get_mask("t")
    mask[:10] = torch.zeros(10)
    expected = original.clone()
    expected[:10] = 0
    assert torch.equal(sp.get_data("t", return_original=False), expected)
    sp.squash_mask()
    assert torch.equal(t, expected)


def test_in_place_idiom_multiply_by_another_mask():
    torch.manual_seed(2)
    t = torch.randn(8, 8)
    original = t.clone()
    sp = FirstRowSparsifier()
    sp.add_data("t", t)
    other_sp = FirstRowSparsifier()
    other_sp.add_data("u", torch.randn(8, 8).t())  # another sparsifier's mask
    another_mask = other_sp.get_mask("u")
    another_mask[:, 3] = False
    mask = sp.get_mask("t")
    mask *= another_mask
    assert sp.get_mask("t") is mask
    expected = original.clone()
    expected[:, 3] = 0
    assert torch.equal(sp.get_data("t", return_original=False), expected)
    sp.squash_mask()
    assert torch.equal(t, expected)


def test_in_place_idiom_multiply_by_float_mask():
    t = torch.randn(8, 8)
    original = t.clone()
    sp = FirstRowSparsifier()
    sp.add_data("t", t)
    another_mask = torch.ones_like(t)
    another_mask[2] = 0
    mask = sp.get_mask("t")
    mask *= another_mask
    expected = original.clone()
    expected[2] = 0
    assert torch.equal(sp.get_data("t", return_original=False), expected)


def test_float_mask_idioms_of_torchs_reference_work_on_the_bool_mask():
    # code written for the reference's fp32 masks: mean(), 1.0 - mask, torch.save + load
    sp = FirstRowSparsifier()
    sp.add_data("t", torch.randn(4, 5))
    sp.step()
    mask = sp.get_mask("t")
    assert mask.dtype == torch.bool
    assert mask.mean().item() == pytest.approx(0.75)
    assert (1.0 - mask.mean()).item() == pytest.approx(0.25)
    assert torch.equal(1.0 - mask, (~mask).float())
    assert torch.equal(mask.mean(0), torch.tensor([0.75] * 5))
    buffer = io.BytesIO()
    torch.save(mask, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only: a plain bool tensor
    assert type(loaded) is torch.Tensor and torch.equal(loaded, mask)


def test_in_place_idiom_assign_data():
    torch.manual_seed(3)
    t = torch.randn(5, 6)
    sp = FirstRowSparsifier()
    sp.add_data("t", t)
    mask = sp.get_mask("t")
    mask.data = torch.zeros_like(mask)
    assert sp.get_mask("t") is mask
    assert torch.equal(sp.get_data("t", return_original=False), torch.zeros(5, 6))
    sp.squash_mask()
    assert torch.equal(t, torch.zeros(5, 6))


def test_user_mask_change_then_step_overrides_it():
    t = torch.randn(5, 6)
    sp = FirstRowSparsifier()
    sp.add_data("t", t)
    sp.get_mask("t").fill_(False)
    sp.step()  # first-row only sets row 0; the rest keeps the user's zeros
    assert not sp.get_mask("t").any()


@pytest.mark.parametrize("method", ["get_mask", "get_data", "squash"])
def test_unknown_name_raises_value_error_naming_it(method):
    sp = FirstRowSparsifier()
    t = torch.randn(3, 3)
    sp.add_data("known", t)
    with pytest.raises(ValueError, match=re.escape("no.such.name")):
        if method == "get_mask":
            sp.get_mask("no.such.name")
        elif method == "get_data":
            sp.get_data("no.such.name")
        else:
            sp.step()
            sp.squash_mask(names=["known", "no.such.name"])
    if method == "squash":
        assert not sp.is_squashed("known")  # nothing changed before the error
        assert t[0].abs().sum() > 0
    with pytest.raises(ValueError, match=re.escape("no.such")):
        sp.get_data("no.such", return_original=False)


# ------------------------------------------------------------------------------ squash


def _three():
    torch.manual_seed(4)
    data = {n: torch.randn(3, 4) for n in ("a", "b", "c")}
    originals = {n: t.clone() for n, t in data.items()}
    sp = FirstRowSparsifier()
    for n, t in data.items():
        sp.add_data(n, t)
    sp.step()
    return sp, data, originals


def _first_row_zeroed(t):
    out = t.clone()
    out[0] = 0
    return out


def test_squash_all():
    sp, data, originals = _three()
    sp.squash_mask()
    for n in data:
        assert torch.equal(data[n], _first_row_zeroed(originals[n]))
        assert sp.is_squashed(n)
        assert sp.get_data(n, return_original=False) is data[n]


def test_squash_subset_only():
    sp, data, originals = _three()
    sp.squash_mask(names=["b"])
    assert torch.equal(data["b"], _first_row_zeroed(originals["b"]))
    assert torch.equal(data["a"], originals["a"])
    assert torch.equal(data["c"], originals["c"])
    assert sp.is_squashed("b") and not sp.is_squashed("a")
    # the others are still masked views
    assert torch.equal(sp.get_data("a", return_original=False), _first_row_zeroed(originals["a"]))


def test_squash_leave_parametrized_false_leaves_data_untouched():
    sp, data, originals = _three()
    sp.squash_mask(leave_parametrized=False)
    for n in data:
        assert torch.equal(data[n], originals[n])
        assert torch.equal(sp.get_data(n, return_original=False), originals[n])
        assert sp.is_squashed(n)


def test_squash_twice_is_harmless():
    sp, data, originals = _three()
    sp.squash_mask(names=["a"])
    sp.squash_mask()
    assert torch.equal(data["a"], _first_row_zeroed(originals["a"]))


def test_squash_writes_what_the_masked_view_shows_for_inf_and_nan():
    t = torch.tensor([[float("inf"), float("nan")], [1.0, 2.0]])
    sp = FirstRowSparsifier()
    sp.add_data("t", t)
    sp.step()
    view = sp.get_data("t", return_original=False).clone()
    sp.squash_mask()
    assert torch.equal(t, view)


def test_squashed_names_are_skipped_by_step():
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    sp = Recording(threshold=0.5)
    sp.add_data("a", a)
    sp.add_data("b", b)
    sp.step()
    mask_a = sp.get_mask("a").clone()
    sp.squash_mask(names=["a"])
    sp.calls.clear()
    sp.data_groups["a"]["threshold"] = 100.0
    sp.step()
    assert [c["name"] for c in sp.calls] == ["b"]
    assert torch.equal(sp.get_mask("a"), mask_a)  # still readable, unchanged
    with pytest.raises(ValueError, match="squashed"):
        sp.get_data("a", return_original=True)


def test_re_add_after_squash():
    t = torch.randn(3, 3)
    sp = FirstRowSparsifier()
    sp.add_data("a", t)
    sp.squash_mask()
    with pytest.warns(UserWarning):
        sp.add_data("a", t)
    assert not sp.is_squashed("a")
    sp.step()
    assert not sp.get_mask("a")[0].any()


# ----------------------------------------------------------------------- names with dots


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)])
        self.emb = nn.EmbeddingBag(10, 8)


def test_names_with_dots_through_add_step_get_squash_state_dict(tmp_path):
    torch.manual_seed(5)
    model = _Encoder()
    params = dict(model.named_parameters())
    assert "encoder.layer.0.weight" in params
    originals = {n: p.detach().clone() for n, p in params.items()}
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 2))
    for n, p in params.items():
        sp.add_data(n, p)
    with pytest.warns(UserWarning, match=re.escape("encoder.layer.0.weight")):
        sp.add_data("encoder.layer.0.weight", params["encoder.layer.0.weight"], sparsity_level=0.75)
    sp.step()
    for n in params:
        assert sp.get_data(n) is params[n]
        mask = sp.get_mask(n)
        assert mask.shape == params[n].shape
        assert torch.equal(sp.get_data(n, return_original=False), originals[n] * mask)
    assert int((~sp.get_mask("encoder.layer.0.weight")).sum()) == 48
    assert int((~sp.get_mask("encoder.layer.0.bias")).sum()) == 4  # 1-D, own shape

    path = tmp_path / "sp.pt"
    torch.save(sp.state_dict(), path)
    loaded = DataNormSparsifier()
    loaded.load_state_dict(torch.load(path))
    assert loaded.data_groups == sp.data_groups
    for n in params:
        assert torch.equal(loaded.get_mask(n), sp.get_mask(n))
        assert torch.equal(loaded.get_data(n), originals[n])

    sp.squash_mask(names=["encoder.layer.0.weight"])
    assert torch.equal(
        model.encoder.layer[0].weight.detach(),
        originals["encoder.layer.0.weight"] * sp.get_mask("encoder.layer.0.weight"),
    )
    assert torch.equal(model.encoder.layer[1].weight.detach(), originals["encoder.layer.1.weight"])
    sp.squash_mask()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), originals[n] * sp.get_mask(n))


TRICKY_NAMES = [
    "a.b",
    "a_b",
    "_data_a_b",
    "a-b",
    "a b",
    "0",
    "class",
    "training",
    "forward",
    "T",
    "mask",
    "original",
    "_keys",
    "_buffers",
    "__dict__",
    "register_buffer",
    "ünïcödé.名前",
    "x" * 300,
]


def test_many_tricky_names_coexist(tmp_path):
    torch.manual_seed(6)
    data = {n: torch.randn(3, 2) for n in TRICKY_NAMES}
    originals = {n: t.clone() for n, t in data.items()}
    sp = FirstRowSparsifier()
    for n, t in data.items():
        sp.add_data(n, t, tag=n)
    sp.step()
    for n in TRICKY_NAMES:
        assert sp.get_data(n) is data[n]
        assert sp.data_groups[n]["tag"] == n
        assert not sp.get_mask(n)[0].any() and sp.get_mask(n)[1:].all()
    path = tmp_path / "names.pt"
    torch.save(sp.state_dict(), path)
    loaded = FirstRowSparsifier()
    loaded.load_state_dict(torch.load(path))
    assert set(loaded.data_groups) == set(TRICKY_NAMES)
    for n in TRICKY_NAMES:
        assert torch.equal(loaded.get_mask(n), sp.get_mask(n))
    copied = copy.deepcopy(sp)
    copied.step()
    sp.squash_mask()
    for n in TRICKY_NAMES:
        assert torch.equal(data[n], _first_row_zeroed(originals[n])), n


def test_name_parametrizations_as_first_name():
    sp = FirstRowSparsifier()
    t = torch.randn(3, 3)
    sp.add_data("parametrizations", t)
    sp.add_data("other", torch.randn(3, 3))
    sp.step()
    sp.squash_mask()
    assert not t[0].any()


def test_name_parametrizations_after_another_name():
    sp = FirstRowSparsifier()
    t = torch.randn(3, 3)
    sp.add_data("other", torch.randn(3, 3))
    sp.add_data("parametrizations", t)
    sp.step()
    sp.squash_mask()
    assert not t[0].any()


# ------------------------------------------------------------------- mask memory / device


def test_mask_is_one_byte_an_entry_on_data_device():
    sp = FirstRowSparsifier()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        sp.add_data(str(dtype), torch.randn(7, 9, dtype=dtype))
    sp.add_data("emb", nn.EmbeddingBag(20, 8))
    sp.step()
    for name in sp.data_groups:
        mask = sp.get_mask(name)
        assert mask.element_size() == 1
        assert mask.untyped_storage().nbytes() == mask.numel()
        assert mask.device == sp.get_data(name).device


def test_mask_on_meta_device():
    sp = FirstRowSparsifier()
    t = torch.empty(1000, 64, device="meta")
    sp.add_data("m", t)
    assert sp.get_mask("m").device.type == "meta"
    assert sp.get_mask("m").element_size() == 1
    sp.step()
    assert sp.get_data("m", return_original=False).device.type == "meta"
    sp.squash_mask()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_data_gets_cuda_mask():
    torch.manual_seed(7)
    t = torch.randn(64, 32, device="cuda", dtype=torch.float16)
    original = t.clone()
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sp.add_data("t", t)
    sp.step()
    mask = sp.get_mask("t")
    assert mask.device.type == "cuda" and mask.element_size() == 1
    cpu = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    cpu.add_data("t", original.cpu().clone())
    cpu.step()
    assert torch.equal(mask.cpu(), cpu.get_mask("t"))
    sp.squash_mask()
    assert torch.equal(t, original * mask)
    path_sd = sp.state_dict()
    loaded = DataNormSparsifier()
    loaded.load_state_dict(path_sd)
    assert loaded.get_mask("t").device.type == "cuda"


# ------------------------------------------------------------------------- state_dict


def _populated():
    torch.manual_seed(8)
    data = {
        "enc.weight": torch.randn(12, 16),
        "enc.bias": torch.randn(16),
        "emb": nn.EmbeddingBag(30, 8),
        "half": torch.randn(5, 9).half(),
    }
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), norm="L2")
    sp.add_data("enc.weight", data["enc.weight"], sparsity_level=0.3)
    sp.add_data("enc.bias", data["enc.bias"])
    sp.add_data("emb", data["emb"], sparse_block_shape=(2, 2), zeros_per_block=3)
    sp.add_data("half", data["half"])
    sp.step()
    sp.squash_mask(names=["half"])
    return sp, data


def _assert_same(a: BaseDataSparsifier, b: BaseDataSparsifier):
    assert list(a.data_groups) == list(b.data_groups)
    assert a.data_groups == b.data_groups
    for n in a.data_groups:
        assert torch.equal(a.get_mask(n).bool(), b.get_mask(n).bool())
        assert a.get_mask(n).dtype == torch.bool
        assert b.get_mask(n).element_size() == 1
        assert b.get_mask(n).shape == b.get_data(n, return_original=False).shape
        assert a.is_squashed(n) == b.is_squashed(n)
        assert torch.equal(
            a.get_data(n, return_original=False), b.get_data(n, return_original=False)
        )
        if not a.is_squashed(n):
            assert torch.equal(a.get_data(n), b.get_data(n))


@pytest.mark.parametrize("weights_only", [None, True])
def test_state_dict_round_trip_through_torch_load(tmp_path, weights_only):
    sp, _ = _populated()
    path = tmp_path / "sd.pt"
    torch.save(sp.state_dict(), path)
    sd = torch.load(path) if weights_only is None else torch.load(path, weights_only=True)
    fresh = DataNormSparsifier(norm="L2")
    fresh.load_state_dict(sd)
    _assert_same(sp, fresh)
    # it steps and squashes like the original
    sp.step()
    fresh.step()
    _assert_same(sp, fresh)
    fresh.squash_mask()
    for n in fresh.data_groups:
        assert torch.equal(
            fresh.get_data(n, return_original=False),
            sp.get_data(n, return_original=False),
        )


def test_state_dict_is_independent_of_later_changes():
    sp, _ = _populated()
    sd = sp.state_dict()
    before = copy.deepcopy(sd)
    sp.get_mask("enc.weight").fill_(False)
    sp.data_groups["enc.weight"]["sparsity_level"] = 0.9
    assert sd["data_groups"] == before["data_groups"]
    assert torch.equal(sd["state"]["enc.weight"]["mask"], before["state"]["enc.weight"]["mask"])


def test_load_state_dict_strict_replaces_and_non_strict_keeps(tmp_path):
    sp, _ = _populated()
    path = tmp_path / "sd.pt"
    torch.save(sp.state_dict(), path)

    extra = torch.randn(4, 4)
    strict = DataNormSparsifier(norm="L2")
    strict.add_data("extra", extra)
    strict.add_data("enc.weight", torch.zeros(3, 3))
    strict.load_state_dict(torch.load(path), strict=True)
    assert "extra" not in strict.data_groups
    _assert_same(sp, strict)

    loose = DataNormSparsifier(norm="L2")
    loose.add_data("extra", extra, sparsity_level=0.25)
    loose.add_data("enc.weight", torch.zeros(3, 3))
    loose.load_state_dict(torch.load(path), strict=False)
    assert next(iter(loose.data_groups)) == "extra"
    assert loose.get_data("extra") is extra
    assert loose.data_groups["extra"]["sparsity_level"] == 0.25
    for n in sp.data_groups:
        assert torch.equal(loose.get_mask(n), sp.get_mask(n))
        assert loose.data_groups[n] == sp.data_groups[n]
    loose.step()
    assert int((~loose.get_mask("extra")).sum()) == 4


def test_load_state_dict_rejects_malformed():
    sp, _ = _populated()
    sd = sp.state_dict()
    fresh = DataNormSparsifier()
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict({"state": sd["state"]})
    broken = dict(sd, data_groups={})
    with pytest.raises(ValueError):
        fresh.load_state_dict(broken)
    broken = dict(sd, _container={})
    with pytest.raises(ValueError):
        fresh.load_state_dict(broken)


def test_state_dict_mask_costs_at_most_one_bit_an_entry(tmp_path):
    data = torch.randn(1000, 64)
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sp.add_data("big", data)
    sp.add_data("odd", torch.randn(13))
    sp.step()
    path = tmp_path / "sd.pt"
    torch.save(sp.state_dict(), path)
    sd = torch.load(path)
    for name, numel in (("big", 64_000), ("odd", 13)):
        saved = [v for v in sd["state"][name].values() if isinstance(v, torch.Tensor)]
        assert saved
        nbytes = sum(t.untyped_storage().nbytes() for t in saved)
        assert nbytes <= (numel + 7) // 8, (name, nbytes)
    # the whole file is the data plus at most an eighth of a byte an entry, plus overhead
    assert path.stat().st_size <= data.numel() * 4 + 13 * 4 + 64_013 / 8 + 64 * 1024


def test_load_torch_reference_state_dict():
    from torch.ao.pruning._experimental.data_sparsifier import (
        DataNormSparsifier as RefDataNorm,
    )

    torch.manual_seed(9)
    ref = RefDataNorm(sparsity_level=0.5)
    ref.add_data("w", torch.randn(8, 12))
    ref.step()
    ours = DataNormSparsifier()
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.get_mask("w"), ref.get_mask("w") != 0)
    assert ours.get_mask("w").dtype == torch.bool


# -------------------------------------------------------------------- pickle / deepcopy


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_copies_keep_attributes_and_still_step(how):
    sp, _ = _populated()
    sp.enable_mask_update = True
    clone = pickle.loads(pickle.dumps(sp)) if how == "pickle" else copy.deepcopy(sp)
    assert clone.norm == "L2"
    assert clone.enable_mask_update is True
    assert clone.defaults == sp.defaults
    _assert_same(sp, clone)
    clone.step()
    sp.step()
    _assert_same(sp, clone)
    # independent: the copy's data and masks are its own
    clone.get_mask("enc.weight").fill_(False)
    assert sp.get_mask("enc.weight").any()
    clone.squash_mask()
    assert sp.get_data("enc.weight").abs().min() > 0
    assert not clone.get_data("enc.weight", return_original=False).any()


@pytest.mark.parametrize("how", ["state_dict", "pickle", "deepcopy"])
def test_restored_masks_are_bool(how):
    sp, _ = _populated()
    if how == "state_dict":
        clone = DataNormSparsifier(norm="L2")
        clone.load_state_dict(sp.state_dict())
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(sp))
    else:
        clone = copy.deepcopy(sp)
    assert {clone.get_mask(n).dtype for n in clone.data_groups} == {torch.bool}


def test_pickle_keeps_enable_mask_update_false():
    sp, _ = _populated()
    sp.enable_mask_update = False
    clone = pickle.loads(pickle.dumps(sp))
    assert clone.enable_mask_update is False


def test_pickle_with_a_scheduler_attached():
    from sparsify_exp import LinearScheduler

    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("w", torch.randn(8, 8))
    sched = LinearScheduler(sp, total_steps=4, target=0.5)
    sp.step()
    sched.step()
    clone = pickle.loads(pickle.dumps(sp))
    assert clone.data_groups["w"]["sparsity_level"] == sp.data_groups["w"]["sparsity_level"]
    clone.step()
    sp.step()
    assert torch.equal(clone.get_mask("w"), sp.get_mask("w"))
    assert int((~clone.get_mask("w").bool()).sum()) == round(0.125 * 16) * 4
    # the scheduler keeps driving the original
    sched.step()
    assert sp.data_groups["w"]["sparsity_level"] == 0.25


# ------------------------------------------------------------------------------- misc


def test_repr_lists_names_and_configs():
    sp = DataNormSparsifier(sparsity_level=0.3)
    sp.add_data("enc.weight", torch.randn(2, 4))
    text = repr(sp)
    assert "enc.weight" in text and "0.3" in text


def test_prepare_is_not_for_data_sparsifiers():
    with pytest.raises(NotImplementedError):
        FirstRowSparsifier().prepare(nn.Linear(2, 2), config=None)


def test_no_warnings_on_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp = DataNormSparsifier()
        sp.add_data("a", torch.randn(4, 8))
        sp.step()
        sp.get_data("a", return_original=False)
        sp.squash_mask()


# ---------------------------------------------------------------------- count_nonfinite


def _nonfinite_data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(20)
    data = torch.randn(37, 53, generator=gen, dtype=torch.float64)
    flat = data.view(-1)
    where = torch.randperm(flat.numel(), generator=gen)
    flat[where[:40]] = float("nan")
    flat[where[40:65]] = float("inf")
    flat[where[65:80]] = -float("inf")
    return data


@pytest.mark.parametrize("chunk", [1, 7, 53, 100, 1 << 20])
@pytest.mark.parametrize(
    "view",
    [
        lambda t: t,
        lambda t: t.t(),
        lambda t: t[::3, 1::2],
        lambda t: t.view(37, 53, 1).expand(37, 53, 4)[:, ::5],
        lambda t: t[:1, :1].squeeze(),  # 0-d
        lambda t: t[:0],
        lambda t: t.half(),
        lambda t: t.to(torch.bfloat16),
        lambda t: torch.complex(t, t.flip(0)),
    ],
)
def test_count_nonfinite_counts_nan_and_inf_in_any_view_and_chunking(view, chunk):
    from sparsify_exp.sparsifier import count_nonfinite

    data = view(_nonfinite_data())
    expected = int((~torch.isfinite(data)).sum())
    assert count_nonfinite(data, chunk_elements=chunk) == expected


def test_count_nonfinite_on_modules_integers_and_parameters():
    from sparsify_exp.sparsifier import count_nonfinite

    emb = nn.EmbeddingBag(10, 4)
    with torch.no_grad():
        emb.weight[3, 1] = float("nan")
        emb.weight[7] = float("inf")
    assert count_nonfinite(emb) == 5
    assert count_nonfinite(emb.weight) == 5  # a parameter that requires grad
    assert count_nonfinite(torch.arange(10)) == 0
    assert count_nonfinite(_nonfinite_data()) == 80
    with pytest.raises(TypeError):
        count_nonfinite(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="chunk_elements"):
        count_nonfinite(torch.ones(3), chunk_elements=0)


@pytest.mark.parametrize("view", [lambda t: t, lambda t: t.t()])
def test_count_nonfinite_allocates_at_most_a_chunk(view):
    """Counts a 4M-entry tensor with no temporary larger than one chunk of it (the largest
    allocation torch's profiler reports), also when the view is not contiguous."""
    from sparsify_exp.sparsifier import count_nonfinite

    data = torch.zeros(2000, 2000)
    data[1999, 3] = float("nan")
    chunk = 1 << 16
    with torch.profiler.profile(profile_memory=True) as prof:
        assert count_nonfinite(view(data), chunk_elements=chunk) == 1
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert chunk <= biggest <= chunk * data.element_size()  # not the data's 16 MB
