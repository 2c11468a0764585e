"""RowSparsifier: prune.ln_structured's masks, whole rows, NaN/inf rows, exact counts, and
compact_rows (the kept rows, the remap, lookups through it, the byte size)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune

from sparsify_exp import CompactRows, ConfigValueError, RowSparsifier, compact_rows

NAN, INF = float("nan"), float("inf")


def ours(data, level: float, norm: str = "L1") -> torch.Tensor:
    sp = RowSparsifier(sparsity_level=level, norm=norm)
    sp.add_data("x", data)
    sp.step()
    return sp.get_mask("x").clone()


def ln_structured(data: torch.Tensor, level: float, n: int) -> torch.Tensor:
    module = nn.Module()
    module.weight = nn.Parameter(data.detach().clone())
    prune.ln_structured(module, "weight", amount=level, n=n, dim=0)
    return module.weight_mask.bool()


def row_oracle(scores: torch.Tensor, level: float) -> torch.Tensor:
    """Kept rows: all but the first round(level * rows) of a stable sort (NaN last)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[: round(level * scores.numel())]] = False
    return keep


@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("shape", [(10, 4), (37, 11), (500, 64), (8, 3, 3, 3)])
@pytest.mark.parametrize("level", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_matches_ln_structured(shape, level, norm):
    data = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = ln_structured(data, level, 1 if norm == "L1" else 2)
    assert torch.equal(ours(data, level, norm), expected)


def test_large_table_whole_rows_and_exact_count():
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(70_000, 32, generator=gen)  # more rows than fit one chunk
    mask = ours(data, 0.8)
    rows_kept = mask.all(1)
    assert torch.equal(mask, rows_kept[:, None].expand_as(mask))  # whole rows
    assert int((~rows_kept).sum()) == 56_000
    assert torch.equal(rows_kept, row_oracle(data.double().abs().sum(1), 0.8))


def test_one_d_data_removes_entries():
    data = torch.tensor([3.0, -1.0, 0.5, NAN, -INF, 2.0])
    assert ours(data, 0.5).tolist() == [True, False, False, True, True, False]
    assert ours(data, 5 / 6).tolist() == [False, False, False, True, False, False]
    assert ours(torch.tensor(2.0), 1.0).item() is False


def test_nan_and_inf_rows_rank_last_and_ties_go_by_position():
    data = torch.zeros(6, 3)
    data[1, 2] = NAN
    data[3, 0] = INF
    data[3, 1] = -INF  # inf beside -inf: still inf
    data[4] = torch.tensor([NAN, INF, 1.0])  # NaN beats inf
    # rows 0, 2, 5 score 0 (ties, by position), row 3 inf, rows 1 and 4 NaN (row 1 first)
    expected = {
        1: [0, 1, 1, 1, 1, 1],
        3: [0, 1, 0, 1, 1, 0],
        4: [0, 1, 0, 0, 1, 0],
        5: [0, 0, 0, 0, 1, 0],
    }
    for k, kept in expected.items():
        for norm in ("L1", "L2"):
            assert ours(data, k / 6, norm)[:, 0].int().tolist() == kept, (k, norm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.complex64])
def test_other_dtypes(dtype):
    data = torch.randn(40, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    mask = ours(data, 0.25)
    scores = data.abs().double().sum(1)
    assert torch.equal(mask[:, 0], row_oracle(scores, 0.25))


def test_non_contiguous_rows():
    base = torch.randn(30, 50, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    view = base[:, ::3]
    assert torch.equal(ours(view, 0.4), ln_structured(view.contiguous(), 0.4, 1))
    transposed = base.t()
    assert torch.equal(ours(transposed, 0.4, "L2"), ln_structured(transposed.contiguous(), 0.4, 2))


def test_embedding_bag_step_squash_and_compact():
    torch.manual_seed(5)
    bag = nn.EmbeddingBag(1000, 16, mode="sum")
    sp = RowSparsifier(sparsity_level=0.7)
    sp.add_data("tables.item", bag)
    sp.step()
    mask = sp.get_mask("tables.item")
    sp.squash_mask()
    compact = compact_rows(bag, mask)
    assert isinstance(compact, CompactRows)
    assert compact.num_rows == 300 and compact.rows.shape == (300, 16)
    assert compact.nbytes == 300 * 16 * 4 + 1000 * 8
    # lookups through the remap read what the squashed table holds
    ids = torch.randint(0, 1000, (64, 5))
    offsets = torch.arange(0, 320, 5)
    expected = bag(ids.view(-1), offsets)
    new = compact.remap[ids]
    found = (new >= 0).unsqueeze(-1)
    rows = compact.rows[new.clamp(min=0)] * found
    torch.testing.assert_close(rows.sum(1), expected)
    again = F.embedding_bag(
        new.clamp(min=0).view(-1),
        compact.rows,
        offsets,
        mode="sum",
        per_sample_weights=found.view(-1).float(),
    )
    torch.testing.assert_close(again, expected)


def test_compact_rows_from_row_masks_and_partial_rows():
    weight = torch.arange(12.0).view(4, 3)
    rows, remap = compact_rows(weight, torch.tensor([True, False, True, False]))
    assert torch.equal(rows, weight[[0, 2]])
    assert remap.tolist() == [0, -1, 1, -1] and remap.dtype == torch.int64
    partial = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1]])
    compact = compact_rows(weight, partial, index_dtype=torch.int32)
    assert torch.equal(compact.rows, torch.tensor([[0.0, 0.0, 2.0], [9.0, 10.0, 11.0]]))
    assert compact.remap.tolist() == [0, -1, -1, 1] and compact.remap.dtype == torch.int32
    assert compact.nbytes == 6 * 4 + 4 * 4
    entries = compact_rows(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert entries.rows.tolist() == [2.0, 3.0] and entries.remap.tolist() == [-1, 0, 1]
    nothing = compact_rows(weight, torch.zeros(4, dtype=torch.bool))
    assert nothing.num_rows == 0 and nothing.rows.shape == (0, 3)


def test_compact_rows_rejects_what_it_cannot_compact():
    with pytest.raises(ValueError, match="fits neither"):
        compact_rows(torch.ones(4, 3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one dimension"):
        compact_rows(torch.tensor(1.0), torch.tensor(True))
    with pytest.raises(ValueError, match="index_dtype"):
        compact_rows(torch.ones(4, 3), torch.ones(4), index_dtype=torch.int16)


def test_state_dict_round_trip_with_dotted_names():
    torch.manual_seed(6)
    sp = RowSparsifier(sparsity_level=0.5, norm="L2")
    sp.add_data("tables.user.weight", nn.Embedding(30, 4))
    sp.add_data("conv.weight", torch.randn(8, 3, 3, 3), sparsity_level=0.25)
    sp.step()
    buffer = io.BytesIO()
    torch.save(sp.state_dict(), buffer)
    buffer.seek(0)
    loaded = RowSparsifier(norm="L2")
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    loaded.step()
    for name in sp.data_groups:
        assert torch.equal(loaded.get_mask(name), sp.get_mask(name))
    assert int((~loaded.get_mask("conv.weight")).view(8, -1).all(1).sum()) == 2


def test_edge_shapes():
    for shape in [(0,), (0, 4), (5, 0), (1, 1)]:
        mask = ours(torch.ones(shape), 1.0)
        assert mask.shape == shape


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(sparsity_level=1.5), "sparsity_level"),
        (dict(sparsity_level=-0.5), "sparsity_level"),
        (dict(norm="L3"), "norm"),
        (dict(norm="l2"), "norm"),
        (dict(scope="global"), "scope"),
        (dict(scope="per-row"), "scope"),
    ],
    ids=repr,
)
def test_bad_arguments_are_config_value_errors(kwargs, key):
    with pytest.raises(ConfigValueError) as info:
        RowSparsifier(**kwargs)
    assert info.value.key == key


def test_a_bad_per_name_level_names_the_data():
    sp = RowSparsifier()
    with pytest.raises(ConfigValueError, match=r"'tables\.user'"):
        sp.add_data("tables.user", torch.randn(4, 4), sparsity_level=2)


# ---------------------------------------------------------------- score = usage


def usage_mask(data, counts, level, score="usage", **kwargs) -> torch.Tensor:
    sp = RowSparsifier(sparsity_level=level, score=score, **kwargs)
    sp.add_data("t", data, row_counts=counts)
    sp.step()
    return sp.get_mask("t").clone()


def test_usage_removes_the_least_used_rows_whatever_their_norm():
    data = torch.tensor([[0.1], [5.0], [0.2], [9.0], [0.3]])
    counts = torch.tensor([50, 0, 7, 1, 3])
    mask = usage_mask(data, counts, 0.6)
    # counts 0, 1, 3 go: the large rows 1 and 3 and row 4; norm would remove 0, 2, 4
    assert mask[:, 0].tolist() == [True, False, True, False, False]
    assert usage_mask(data, counts, 0.6, score="norm")[:, 0].tolist() == [
        False, True, False, True, False,
    ]  # fmt: skip


def test_equal_counts_go_by_position_or_by_norm():
    data = torch.tensor([[4.0], [1.0], [3.0], [2.0], [0.5]])
    counts = torch.tensor([0, 0, 0, 0, 9])
    assert usage_mask(data, counts, 0.4)[:, 0].tolist() == [False, False, True, True, True]
    by_norm = usage_mask(data, counts, 0.4, score="usage_then_norm")
    assert by_norm[:, 0].tolist() == [True, False, True, False, True]


def test_usage_then_norm_on_a_table_with_nan_rows():
    gen = torch.Generator().manual_seed(3)
    data = torch.randn(1000, 8, generator=gen)
    data[5, 0] = NAN
    counts = torch.randint(0, 4, (1000,), generator=gen)
    counts[5] = 0
    assert int((counts == 0).sum()) > 200
    mask = usage_mask(data, counts, 0.2, score="usage_then_norm", norm="L2")
    scores = data.double().square().sum(1)
    keys = sorted(
        range(1000), key=lambda i: (int(counts[i]), INF if i == 5 else float(scores[i]), i)
    )
    expected = torch.ones(1000, dtype=torch.bool)
    expected[keys[:200]] = False
    assert torch.equal(mask.all(1), expected)
    assert bool(mask[5].all())  # the NaN row is the last of the unused rows


def test_usage_packed_mask_state_dict_and_embedding_bag():
    from sparsify_exp.sparsifier.packed_mask import PackedMask

    gen = torch.Generator().manual_seed(4)
    table = nn.EmbeddingBag(300, 16, mode="sum")
    counts = torch.randint(0, 100, (300,), generator=gen)
    dense = usage_mask(table.weight, counts, 0.5)
    sp = RowSparsifier(sparsity_level=0.5, score="usage")
    sp.add_data("emb.weight", table.weight, row_counts=counts, mask=PackedMask.full((300, 16)))
    sp.step()
    assert torch.equal(sp.get_mask("emb.weight").unpack(), dense)
    buffer = io.BytesIO()
    sp2 = RowSparsifier(sparsity_level=0.5, score="usage")
    sp2.add_data("emb.weight", table, row_counts=counts)
    sp2.step()
    torch.save(sp2.state_dict(), buffer)
    buffer.seek(0)
    loaded = RowSparsifier(score="usage")
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    loaded.get_mask("emb.weight").fill_(True)
    loaded.step()
    assert torch.equal(loaded.get_mask("emb.weight"), dense)
    assert loaded.calibration_needs == ("row_counts",)
    assert RowSparsifier().calibration_needs == ()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({}, r"data 't': row_counts=None: score=usage needs"),
        ({"row_counts": torch.ones(4)}, r"one count a row: 5"),
        ({"row_counts": -torch.ones(5)}, r"counts must be >= 0"),
        ({"row_counts": torch.ones(5, 1)}, r"1-D real tensor"),
    ],
)
def test_bad_usage_config_names_the_key(config, match):
    sp = RowSparsifier(score="usage")
    with pytest.raises(ConfigValueError, match=match):
        sp.add_data("t", torch.randn(5, 2), **config)
    with pytest.raises(ConfigValueError, match="score='often'"):
        RowSparsifier(score="often")


def test_usage_then_last_removes_the_later_rows_of_equal_count():
    data = torch.ones(6, 2)
    counts = torch.tensor([0, 5, 0, 0, 1, 0])
    mask = usage_mask(data, counts, 0.5, score="usage_then_last")
    # unused rows 0, 2, 3, 5: the last ones (5, 3, 2) go first
    assert mask[:, 0].tolist() == [True, True, False, False, True, False]
