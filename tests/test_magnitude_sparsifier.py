"""MagnitudeSparsifier (local scope): prune.l1_unstructured's masks, exact counts on any data,
NaN/inf ranking, the chunked selection's fallbacks, checkpoints and config errors."""

from __future__ import annotations

import io
import random

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from sparsify_exp import ConfigValueError, MagnitudeSparsifier
from sparsify_exp.sparsifier import select

NAN, INF = float("nan"), float("inf")


def ours(data: torch.Tensor, level: float, **kwargs) -> torch.Tensor:
    sp = MagnitudeSparsifier(sparsity_level=level, **kwargs)
    sp.add_data("x", data)
    sp.step()
    mask = sp.get_mask("x")
    assert mask.shape == data.shape and mask.dtype == torch.bool
    return mask.clone()


def l1_unstructured(data: torch.Tensor, level: float) -> torch.Tensor:
    module = nn.Module()
    module.weight = nn.Parameter(data.detach().clone())
    prune.l1_unstructured(module, "weight", amount=level)
    return module.weight_mask.bool()


def sort_oracle(data: torch.Tensor, level: float) -> torch.Tensor:
    """The documented order: torch's stable sort of |x| (NaN last, ties by position)."""
    k = round(level * data.numel())
    keep = torch.ones(data.numel(), dtype=torch.bool)
    keep[torch.argsort(data.abs().reshape(-1), stable=True)[:k]] = False
    return keep.view(data.shape)


# ------------------------------------------------------------- differential vs torch


def _case(seed: int):
    rng = random.Random(seed)
    dims = rng.choice([1, 2, 2, 3, 4])
    shape = tuple(rng.randint(1, 12 if dims > 2 else 60) for _ in range(dims))
    dtype = rng.choice([torch.float32, torch.float64])
    level = rng.choice([0.0, 1.0, 0.5, 0.8, 0.1, rng.random()])
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype), level


@pytest.mark.parametrize("seed", range(40))
def test_matches_l1_unstructured_on_random_shapes(seed):
    data, level = _case(seed)
    assert torch.equal(ours(data, level), l1_unstructured(data, level)), (data.shape, level)


@pytest.mark.parametrize("level", [0.0005, 0.3, 0.8, 0.9999])
def test_matches_l1_unstructured_on_the_sampled_path(level):
    """More entries than select.SMALL_KEYS and than a chunk: sample, bracket, one pass."""
    data = torch.randn(1100, 1000, generator=torch.Generator().manual_seed(1))
    assert data.numel() > max(select.SMALL_KEYS, select.CHUNK_ELEMENTS)
    assert torch.equal(ours(data, level), l1_unstructured(data, level))


def test_embedding_bag_with_a_dotted_name_steps_and_squashes():
    torch.manual_seed(2)
    bag = nn.EmbeddingBag(300, 16)
    original = bag.weight.detach().clone()
    sp = MagnitudeSparsifier(sparsity_level=0.8)
    sp.add_data("tables.item.weight", bag)
    sp.step()
    mask = sp.get_mask("tables.item.weight").clone()
    assert torch.equal(mask, l1_unstructured(original, 0.8))
    sp.squash_mask()
    assert torch.equal(bag.weight.detach(), original * mask)
    assert int((bag.weight == 0).sum()) == round(0.8 * 300 * 16)


def test_non_contiguous_views_rank_in_row_major_order():
    base = torch.randn(40, 301, generator=torch.Generator().manual_seed(3))
    for view in (base.t(), base[:, 1::2], base[5:, 3:].t()[::2]):
        for level in (0.25, 0.7):
            assert torch.equal(ours(view, level), sort_oracle(view, level))
    big = torch.randn(700, 1601, generator=torch.Generator().manual_seed(4))[:, 1::2]
    assert torch.equal(ours(big, 0.6), sort_oracle(big, 0.6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.complex64])
def test_other_dtypes_rank_by_abs(dtype):
    data = torch.randn(50, 40, generator=torch.Generator().manual_seed(5)).to(dtype)
    for level in (0.3, 0.75):
        mask = ours(data, level)
        assert int((~mask).sum()) == round(level * data.numel())
        removed, kept = data.abs()[~mask], data.abs()[mask]
        assert removed.double().max() <= kept.double().min()


def test_float64_ranks_values_float32_cannot_tell_apart():
    data = torch.tensor([1.0 + 1e-12, 1.0, 1.0 + 2e-12, 1.0 + 3e-12], dtype=torch.float64)
    assert ours(data, 0.5).tolist() == [False, False, True, True]


# ---------------------------------------------------------------- exact counts and ties


@pytest.mark.parametrize("level", [0.1, 0.37, 0.5, 0.9])
def test_ties_remove_exactly_round_level_numel_by_position(level):
    data = torch.zeros(13, 7)
    mask = ours(data, level)
    k = round(level * data.numel())
    assert int((~mask).sum()) == k
    assert not mask.view(-1)[:k].any() and mask.view(-1)[k:].all()
    # -0.0 and 0.0 are the same magnitude
    signed = torch.where(torch.arange(91).view(13, 7) % 2 == 0, 0.0, -0.0)
    assert torch.equal(ours(signed, level), mask)


def test_counts_over_many_sizes_and_levels():
    bad = []
    for n in range(1, 60):
        data = torch.randint(0, 3, (n,)).float()  # many ties
        for level in (0.1, 0.3, 0.5, 0.7, 0.9):
            mask = ours(data, level)
            if int((~mask).sum()) != round(level * n) or not torch.equal(
                mask, sort_oracle(data, level)
            ):
                bad.append((n, level))
    assert not bad


@pytest.mark.parametrize("level", [0.2, 0.5, 0.7, 0.95])
def test_large_tensor_with_massive_ties_against_the_oracle(level):
    """Half the entries are 0: the bracket collapses to one key, or ties exceed the
    candidate cap and the histogram narrowing must finish the job."""
    gen = torch.Generator().manual_seed(6)
    data = torch.randn(1_200_000, generator=gen)
    data[torch.randperm(data.numel(), generator=gen)[:600_000]] = 0.0
    assert torch.equal(ours(data, level), sort_oracle(data, level))


def test_a_misleading_sample_falls_back_to_an_exact_selection():
    n = 600_000
    data = torch.rand(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5
    data[:: n // select.SAMPLE_SIZE] += 1000.0  # every sampled entry is huge
    for level in (0.3, 0.95):
        assert torch.equal(ours(data, level), sort_oracle(data, level)), level


def test_narrowing_alone_is_exact(monkeypatch):
    """The histogram fallback, forced for every selection, gives the sort oracle's mask."""
    monkeypatch.setattr(select, "_bracket", lambda *args: (1, 0))  # an empty bracket
    narrow, calls = select._narrow, []
    monkeypatch.setattr(select, "_narrow", lambda *a: calls.append(1) or narrow(*a))
    gen = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.float64):
        data = torch.randn(400_000, generator=gen, dtype=dtype)
        data[:1000] = NAN
        data[1000:1100] = -INF
        for level in (0.01, 0.5, 0.999):
            assert torch.equal(ours(data, level), sort_oracle(data, level)), (dtype, level)
    assert len(calls) == 6


# ------------------------------------------------------------------------ NaN and inf


def test_nan_ranks_above_inf_above_finite():
    data = torch.tensor([NAN, 1.0, INF, -INF, 0.0, -0.0, 2.0, NAN])
    expected = {
        1: [1, 1, 1, 1, 0, 1, 1, 1],
        2: [1, 1, 1, 1, 0, 0, 1, 1],
        3: [1, 0, 1, 1, 0, 0, 1, 1],
        4: [1, 0, 1, 1, 0, 0, 0, 1],
        5: [1, 0, 0, 1, 0, 0, 0, 1],  # +inf and -inf tie: the first by position goes
        6: [1, 0, 0, 0, 0, 0, 0, 1],
        7: [0, 0, 0, 0, 0, 0, 0, 1],  # NaN last, the first NaN first
        8: [0] * 8,
    }
    for k, keep in expected.items():
        assert ours(data, k / 8).int().tolist() == keep, k


@pytest.mark.parametrize(
    ("nan_fraction", "level"), [(0.1, 0.95), (0.5, 0.3), (0.5, 0.7), (1.0, 0.4)]
)
def test_nan_and_inf_on_the_sampled_path_against_the_oracle(nan_fraction, level):
    gen = torch.Generator().manual_seed(9)
    n = 500_000
    data = torch.randn(n, generator=gen)
    data[torch.randperm(n, generator=gen)[: round(nan_fraction * n)]] = NAN
    data[torch.randperm(n, generator=gen)[:300]] = INF
    mask = ours(data, level)
    assert int((~mask).sum()) == round(level * n)
    assert torch.equal(mask, sort_oracle(data, level))


def test_nan_payloads_and_signs_all_rank_alike():
    nans = torch.tensor([0x7FC00000, 0xFFC00000 - 2**32, 0x7F800001, 0x7FFFFFFF], dtype=torch.int32)
    data = torch.cat([nans.view(torch.float32), torch.tensor([1.0])])
    assert ours(data, 0.6).tolist() == [False, False, True, True, False]


def test_l1_unstructured_agrees_on_nan_and_inf_without_ties():
    data = torch.tensor([[NAN, 3.0, -INF], [0.5, -2.0, 7.0]])
    for level in (1 / 6, 0.5, 5 / 6):
        assert torch.equal(ours(data, level), l1_unstructured(data, level)), level


# ---------------------------------------------------------- data, checkpoints, scope


def test_edge_shapes():
    for shape in [(), (0,), (0, 4), (1, 1), (5, 0)]:
        data = torch.ones(shape)
        mask = ours(data, 1.0)
        assert mask.shape == shape
        assert int((~mask).sum()) == data.numel()
    assert ours(torch.tensor(2.0), 0.4).item() is True  # round(0.4) == 0


def test_state_dict_round_trip_keeps_masks_and_config():
    torch.manual_seed(10)
    data = {"encoder.layer.0.weight": torch.randn(20, 30), "emb": nn.Embedding(50, 8)}
    sp = MagnitudeSparsifier(sparsity_level=0.6)
    for name, value in data.items():
        sp.add_data(name, value)
    sp.add_data("bias", torch.randn(30), sparsity_level=0.2)
    sp.step()
    buffer = io.BytesIO()
    torch.save(sp.state_dict(), buffer)
    buffer.seek(0)
    loaded = MagnitudeSparsifier()
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.data_groups == sp.data_groups
    for name in sp.data_groups:
        assert torch.equal(loaded.get_mask(name), sp.get_mask(name))
    loaded.step()
    for name in sp.data_groups:
        assert torch.equal(loaded.get_mask(name), sp.get_mask(name))
    assert int((~loaded.get_mask("bias")).sum()) == round(0.2 * 30)


def test_a_non_contiguous_user_mask_is_overwritten_in_place():
    data = torch.randn(6, 9)
    sp = MagnitudeSparsifier(sparsity_level=0.5)
    sp.add_data("x", data, mask=torch.ones(9, 6).t())
    mask = sp.get_mask("x")
    sp.step()
    assert sp.get_mask("x") is mask
    assert torch.equal(mask, sort_oracle(data, 0.5))


BAD_LEVELS = [-0.1, 1.5, NAN, "0.5", None, True]


@pytest.mark.parametrize("level", BAD_LEVELS, ids=repr)
def test_bad_levels_are_config_value_errors(level):
    with pytest.raises(ConfigValueError) as info:
        MagnitudeSparsifier(sparsity_level=level)
    assert info.value.key == "sparsity_level"
    sp = MagnitudeSparsifier()
    with pytest.raises(ConfigValueError, match=r"'layer\.0\.weight'") as info:
        sp.add_data("layer.0.weight", torch.randn(3), sparsity_level=level)
    assert info.value.name == "layer.0.weight" and "layer.0.weight" not in sp.data_groups


@pytest.mark.parametrize("scope", ["Global", "both", None, 1])
def test_unknown_scope_is_a_config_value_error(scope):
    with pytest.raises(ConfigValueError, match="local, global") as info:
        MagnitudeSparsifier(scope=scope)
    assert info.value.key == "scope"


def test_a_level_set_after_add_data_is_checked_at_step():
    sp = MagnitudeSparsifier()
    sp.add_data("x", torch.randn(4))
    sp.data_groups["x"]["sparsity_level"] = 2.0
    with pytest.raises(ConfigValueError, match="sparsity_level"):
        sp.step()
