"""DataNormSparsifier: the reference's masks entry for entry, argument checks, ties, dtypes."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.data_sparsifier import (
    DataNormSparsifier as RefDataNorm,
)

from sparsify_exp import DataNormSparsifier
from sparsify_exp.sparsifier import block_ops

# ---------------------------------------------------------------------------------- helpers


def ours_mask(data: torch.Tensor, **kwargs) -> torch.Tensor:
    sp = DataNormSparsifier(**kwargs)
    sp.add_data("x", data)
    sp.step()
    mask = sp.get_mask("x")
    assert mask.shape == data.shape
    assert mask.dtype == torch.bool
    return mask.clone()


def ref_mask(data: torch.Tensor, **kwargs) -> torch.Tensor:
    """torch's mask, as bool of the data's shape (it returns (1, N) for 1-D data)."""
    sp = RefDataNorm(**kwargs)
    sp.add_data("x", data.clone())
    sp.step()
    mask = sp.get_mask("x")
    assert mask.numel() == data.numel()
    return (mask != 0).reshape(data.shape)


def _per_block(t2d: torch.Tensor, block: tuple[int, int], reduce, dtype) -> torch.Tensor:
    """``reduce`` of each (possibly partial) block of ``t2d``, one Python loop: an oracle."""
    height, width = t2d.shape
    bh, bw = block
    rows, cols = math.ceil(height / bh), math.ceil(width / bw)
    out = torch.empty(rows, cols, dtype=dtype)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = reduce(t2d[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw])
    return out


def grid_scores(data: torch.Tensor, block: tuple[int, int], norm: str = "L1") -> torch.Tensor:
    """Float64 mean of |x| (or x**2) over each block's valid entries: an independent oracle."""
    d2 = block_ops.as_2d(data).double()
    values = d2.abs() if norm == "L1" else d2.square()
    return _per_block(values, block, lambda b: b.mean(), torch.float64)


def block_removed(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(rows, cols) bool: True where every entry of the block is zeroed."""
    return _per_block(block_ops.as_2d(mask), block, lambda b: not b.any(), torch.bool)


def check_lowest_blocks_removed(data, mask, block, level, norm="L1"):
    """Exactly round(level * num_blocks) blocks removed, none scoring above a kept one."""
    scores = grid_scores(data, block, norm)
    removed = block_removed(mask, block)
    # a block is either wholly removed or wholly kept
    m2 = block_ops.as_2d(mask)
    kept_blocks = ~removed
    bh, bw = block
    for r, c in kept_blocks.nonzero().tolist():
        assert m2[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw].all()
    assert int(removed.sum()) == round(level * scores.numel())
    if removed.any() and kept_blocks.any():
        assert scores[removed].max() <= scores[kept_blocks].min()


# ------------------------------------------------------------- differential vs torch's


def _random_case(seed: int):
    rng = random.Random(seed)
    one_d = rng.random() < 0.3
    block = rng.choice([(1, 1), (1, 2), (1, 4), (2, 2), (2, 3), (4, 4), (3, 1), (1, 8), (4, 1)])
    if one_d:
        block = (1, block[1])
        shape = (rng.randint(1, 70),)
    else:
        shape = (rng.randint(1, 40), rng.randint(1, 40))
    level = rng.choice([0.0, 1.0, 0.5, 0.3, 0.75, 0.9, 0.1, rng.random()])
    per_block = block[0] * block[1]
    zeros = rng.choice([None, None, 0, per_block, *range(1, per_block + 1)])
    norm = rng.choice(["L1", "L2"])
    torch.manual_seed(seed)
    data = torch.randn(shape, dtype=torch.float64 if rng.random() < 0.3 else torch.float32)
    return data, dict(
        sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm
    )


SEEDS = list(range(240))


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_reference_on_random_shapes(seed):
    data, kwargs = _random_case(seed)
    try:
        expected = ref_mask(data, **kwargs)
    except Exception as error:  # the reference itself cannot handle this combination
        pytest.skip(f"reference crashes on {tuple(data.shape)} {kwargs}: {error!r}")
    got = ours_mask(data, **kwargs)
    assert torch.equal(got, expected), (tuple(data.shape), kwargs)


def test_differential_cases_cover_the_space():
    """The seeded cases include each feature the reference comparison must exercise."""
    cases = [_random_case(seed) for seed in range(240)]
    shapes = [d.shape for d, _ in cases]
    kw = [k for _, k in cases]
    assert any(len(s) == 1 for s in shapes) and any(len(s) == 2 for s in shapes)
    assert {k["sparsity_level"] for k in kw} >= {0.0, 1.0}
    assert {k["norm"] for k in kw} == {"L1", "L2"}
    assert any(k["zeros_per_block"] is None for k in kw)
    assert any(k["zeros_per_block"] == 2 and k["sparse_block_shape"] == (1, 4) for k in kw)
    blocks = {k["sparse_block_shape"] for k in kw}
    assert len(blocks) >= 6
    # non-multiples of the block in both directions
    assert any(
        len(s) == 2 and s[0] % k["sparse_block_shape"][0] and s[1] % k["sparse_block_shape"][1]
        for s, k in zip(shapes, kw, strict=True)
    )


@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("level", [0.0, 0.05, 0.5, 0.8, 0.999, 1.0])
def test_matches_reference_on_large_tensor(level, norm):
    """600k blocks: the sampled k-th value path (> 65536 blocks) must still be exact."""
    torch.manual_seed(1)
    data = torch.randn(300_000, 8, dtype=torch.float64)  # float64: no near-ties either side
    kwargs = dict(sparsity_level=level, sparse_block_shape=(1, 4), norm=norm)
    assert torch.equal(ours_mask(data, **kwargs), ref_mask(data, **kwargs))


def test_matches_reference_on_large_fp32_tensor_with_partial_blocks():
    # magnitudes are distinct integers spaced far apart, so fp32 sums keep their order
    gen = torch.Generator().manual_seed(2)
    height, width = 200_001, 7  # (2, 3) blocks: 100_001 x 3 blocks, partial row and column
    mags = (torch.randperm(height * width, generator=gen) + 1).float().view(height, width)
    signs = torch.randint(0, 2, (height, width), generator=gen).float() * 2 - 1
    data = mags * signs
    for level, zeros in [(0.37, None), (0.6, 4)]:
        kwargs = dict(sparsity_level=level, sparse_block_shape=(2, 3), zeros_per_block=zeros)
        try:
            expected = ref_mask(data, **kwargs)
        except Exception as error:
            pytest.skip(f"reference crashes: {error!r}")
        assert torch.equal(ours_mask(data, **kwargs), expected), kwargs


def test_large_tensor_against_sorting_oracle_with_adversarial_sample():
    """Entries the strided sample sees are all huge: the selection must not trust it."""
    n = 200_000
    gen = torch.Generator().manual_seed(3)
    data = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    stride = n // (1 << 14)
    data[::stride] += 1000.0
    for level in (0.3, 0.5, 0.95):
        mask = ours_mask(data, sparsity_level=level, sparse_block_shape=(1, 1))
        k = round(level * n)
        expected = torch.ones(n, dtype=torch.bool)
        expected[torch.argsort(data.abs())[:k]] = False
        assert torch.equal(mask, expected), level


def test_more_blocks_than_one_chunk_against_oracle():
    """> 2**20 blocks: counting, selecting and tie-taking run over several chunks."""
    n = 1_300_000
    assert n > block_ops.CHUNK_ELEMENTS
    gen = torch.Generator().manual_seed(31)
    data = torch.randn(n, generator=gen, dtype=torch.float64)
    mask = ours_mask(data, sparsity_level=0.9, sparse_block_shape=(1, 1))
    expected = torch.ones(n, dtype=torch.bool)
    expected[torch.argsort(data.abs())[: round(0.9 * n)]] = False
    assert torch.equal(mask, expected)
    # all equal: the first k by position, k spanning more than one chunk
    mask = ours_mask(torch.zeros(n), sparsity_level=0.9, sparse_block_shape=(1, 1))
    k = round(0.9 * n)
    assert not mask[:k].any() and mask[k:].all()


@pytest.mark.parametrize("level", [0.001, 0.25, 0.5, 0.999])
def test_large_sorted_and_reversed_layouts_against_oracle(level):
    n = 120_000
    for data in (torch.linspace(1, 2, n, dtype=torch.float64), torch.linspace(2, 1, n)):
        mask = ours_mask(data, sparsity_level=level, sparse_block_shape=(1, 1))
        expected = torch.ones(n, dtype=torch.bool)
        expected[torch.argsort(data.abs(), stable=True)[: round(level * n)]] = False
        assert torch.equal(mask, expected)


def test_nd_conv_weight_is_flattened_to_shape0_by_rest():
    torch.manual_seed(4)
    weight = nn.Conv2d(3, 8, kernel_size=3).weight.data  # (8, 3, 3, 3)
    kwargs = dict(sparsity_level=0.5, sparse_block_shape=(2, 4))
    got = ours_mask(weight, **kwargs)
    assert got.shape == weight.shape
    expected = ref_mask(weight.reshape(8, -1), **kwargs).reshape(weight.shape)
    assert torch.equal(got, expected)
    # and it is masked, stepped and squashed as any other data
    conv = nn.Conv2d(3, 8, kernel_size=3)
    original = conv.weight.detach().clone()
    sp = DataNormSparsifier(**kwargs)
    sp.add_data("conv.weight", conv.weight)
    sp.step()
    mask = sp.get_mask("conv.weight").clone()
    assert 0 < int((~mask).sum()) < mask.numel()
    sp.squash_mask()
    assert torch.equal(conv.weight.detach(), original * mask)


def test_size_one_dims_are_squeezed_like_the_reference():
    torch.manual_seed(5)
    data = torch.randn(1, 13, 1, 10)
    kwargs = dict(sparsity_level=0.4, sparse_block_shape=(2, 3), zeros_per_block=2)
    assert torch.equal(ours_mask(data, **kwargs), ref_mask(data, **kwargs))


def test_one_d_data_gets_a_mask_of_its_own_shape():
    torch.manual_seed(6)
    bias = torch.randn(37)
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sp.add_data("bias", bias)
    sp.step()
    mask = sp.get_mask("bias")
    assert mask.shape == (37,)
    assert sp.get_data("bias", return_original=False).shape == (37,)
    assert torch.equal(mask, ref_mask(bias, sparsity_level=0.5, sparse_block_shape=(1, 4)))
    check_lowest_blocks_removed(bias, mask, (1, 4), 0.5)


def test_scalar_data():
    sp = DataNormSparsifier(sparsity_level=1.0)
    value = torch.tensor(3.0)
    sp.add_data("s", value)
    sp.step()
    assert sp.get_mask("s").shape == ()
    assert not bool(sp.get_mask("s"))


# ----------------------------------------------------------------- semantics without ref


def test_removed_block_count_is_round_of_level_times_num_blocks():
    """Minimal repro: (21, 40) data, (1, 8) blocks -> 105 blocks; round(0.9 * 105) == 94."""
    torch.manual_seed(17)
    data = torch.randn(21, 40)
    mask = ours_mask(data, sparsity_level=0.9, sparse_block_shape=(1, 8))
    assert int(block_removed(mask, (1, 8)).sum()) == round(0.9 * 105) == 94


def test_removed_block_count_over_many_grids():
    """round(level * num_blocks) blocks over a sweep of levels and grids (no float drift)."""
    mismatches = []
    for rows in range(1, 30):
        for cols in (1, 3, 5, 7):
            for level in (0.1, 0.3, 0.5, 0.7, 0.9):
                expected = round(level * (rows * cols))
                mask = ours_mask(
                    torch.rand(rows, cols) + 1, sparsity_level=level, sparse_block_shape=(1, 1)
                )
                if int((~mask).sum()) != expected:
                    mismatches.append((rows, cols, level))
    assert not mismatches


def test_two_of_four_semi_structured():
    torch.manual_seed(7)
    data = torch.randn(64, 32)
    mask = ours_mask(data, sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    groups = mask.view(64, 8, 4)
    assert torch.equal((~groups).sum(-1), torch.full((64, 8), 2))
    # the two zeros are the two smallest |x| of their group
    smallest = data.abs().view(64, 8, 4).argsort(-1)[..., :2]
    expected = torch.ones(64, 8, 4, dtype=torch.bool)
    expected.scatter_(-1, smallest, False)
    assert torch.equal(groups, expected)


def test_zeros_per_block_only_inside_removed_blocks():
    torch.manual_seed(8)
    data = torch.randn(16, 16)
    mask = ours_mask(data, sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=1)
    per_group_zeros = (~mask.view(16, 4, 4)).sum(-1)
    assert set(per_group_zeros.unique().tolist()) == {0, 1}
    assert int((per_group_zeros == 1).sum()) == 32


@pytest.mark.parametrize("level", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("block", [(1, 4), (2, 3), (4, 4)])
def test_ties_remove_exact_count_deterministically_by_position(level, block):
    data = torch.zeros(10, 13)
    sp = DataNormSparsifier(sparsity_level=level, sparse_block_shape=block)
    sp.add_data("z", data)
    sp.step()
    first = sp.get_mask("z").clone()
    sp.step()
    assert torch.equal(sp.get_mask("z"), first)
    removed = block_removed(first, block)
    k = round(level * removed.numel())
    assert int(removed.sum()) == k
    # ties are broken by position: the first k blocks in row-major order go
    expected = torch.zeros(removed.numel(), dtype=torch.bool)
    expected[:k] = True
    assert torch.equal(removed.flatten(), expected)
    # a second sparsifier on equal data picks the same blocks
    assert torch.equal(ours_mask(torch.full((10, 13), 2.5), **sp.defaults), first)


@pytest.mark.parametrize("level", [0.1, 0.5, 0.73])
def test_ties_on_large_tensor_remove_exact_count(level):
    """> 65536 equal blocks (sampled path) and a few distinct ones: exact count still."""
    data = torch.ones(150_000, 4)
    data[:1000] = 0.5  # strictly lower: always removed first
    mask = ours_mask(data, sparsity_level=level, sparse_block_shape=(1, 4))
    removed = ~mask[:, 0]
    assert torch.equal(mask, removed[:, None].logical_not().expand(-1, 4))
    k = round(level * 150_000)
    assert int(removed.sum()) == k
    assert removed[:1000].all()
    expected = torch.zeros(150_000, dtype=torch.bool)
    expected[:k] = True
    assert torch.equal(removed, expected)


def test_many_ties_at_the_threshold_small_and_large():
    gen = torch.Generator().manual_seed(9)
    for rows in (50, 100_000):
        data = torch.randint(0, 3, (rows, 4), generator=gen).float()
        for level in (0.2, 0.5, 0.9):
            mask = ours_mask(data, sparsity_level=level, sparse_block_shape=(1, 1))
            removed = ~mask
            assert int(removed.sum()) == round(level * data.numel())
            if removed.any() and mask.any():
                assert data[removed].max() <= data[mask].min()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_step_and_squash(dtype):
    torch.manual_seed(10)
    data = torch.randn(24, 18).to(dtype)
    original = data.clone()
    sp = DataNormSparsifier(sparsity_level=0.6, sparse_block_shape=(2, 4))
    sp.add_data("w", data)
    sp.step()
    mask = sp.get_mask("w")
    assert mask.dtype == torch.bool and mask.element_size() == 1
    check_lowest_blocks_removed(original, mask, (2, 4), 0.6)
    masked = sp.get_data("w", return_original=False)
    assert masked.dtype == dtype
    assert torch.equal(masked, original * mask)
    assert torch.equal(sp.get_data("w"), original)
    sp.squash_mask()
    assert data.dtype == dtype
    assert torch.equal(data, original * mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_fp32_of_the_same_values(dtype):
    torch.manual_seed(11)
    data = torch.randn(40, 33).to(dtype)
    kwargs = dict(sparsity_level=0.45, sparse_block_shape=(1, 4), zeros_per_block=3, norm="L2")
    assert torch.equal(ours_mask(data, **kwargs), ours_mask(data.float(), **kwargs))


def test_l1_and_l2_differ_as_they_should():
    # block A: one large entry (L2 big, L1 small); block B: four medium entries
    data = torch.tensor([[3.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    l1 = ours_mask(data, sparsity_level=0.5, norm="L1")
    l2 = ours_mask(data, sparsity_level=0.5, norm="L2")
    assert torch.equal(l1, torch.tensor([[False] * 4 + [True] * 4]))
    assert torch.equal(l2, torch.tensor([[True] * 4 + [False] * 4]))


def test_embedding_bag_step_and_squash():
    torch.manual_seed(12)
    emb = nn.EmbeddingBag(50, 16)
    original = emb.weight.detach().clone()
    sp = DataNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 4))
    sp.add_data("emb", emb)
    sp.step()
    mask = sp.get_mask("emb").clone()
    assert torch.equal(mask, ref_mask(original, sparsity_level=0.8))
    sp.squash_mask()
    assert torch.equal(emb.weight.detach(), original * mask)
    assert (emb.weight == 0).sum() == 0.8 * 50 * 16


def test_per_name_config_overrides_defaults():
    torch.manual_seed(13)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("a", a)
    sp.add_data("b", b, sparsity_level=0.25, sparse_block_shape=[2, 2], zeros_per_block=3)
    sp.step()
    assert sp.data_groups["b"]["sparse_block_shape"] == (2, 2)
    assert torch.equal(sp.get_mask("a"), ref_mask(a, sparsity_level=0.5))
    assert torch.equal(
        sp.get_mask("b"),
        ref_mask(b, sparsity_level=0.25, sparse_block_shape=(2, 2), zeros_per_block=3),
    )


def test_changing_level_between_steps_recomputes_mask():
    torch.manual_seed(14)
    data = torch.randn(10, 20)
    sp = DataNormSparsifier(sparsity_level=0.2)
    sp.add_data("d", data)
    sp.step()
    assert int((~sp.get_mask("d")).sum()) == round(0.2 * 50) * 4
    sp.data_groups["d"]["sparsity_level"] = 0.9
    sp.step()
    assert int((~sp.get_mask("d")).sum()) == 45 * 4
    sp.data_groups["d"]["sparsity_level"] = 0.0
    sp.step()
    assert sp.get_mask("d").all()


def test_step_overwrites_a_mask_made_float_by_the_user():
    torch.manual_seed(15)
    data = torch.randn(6, 8)
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("d", data)
    mask = sp.get_mask("d")
    mask.data = torch.zeros(6, 8)  # float, as a user of the reference might write
    sp.step()
    assert torch.equal(sp.get_mask("d") != 0, ref_mask(data, sparsity_level=0.5))


# ------------------------------------------------------------------------- argument checks

BAD_ARGS = [
    dict(sparsity_level=-0.1),
    dict(sparsity_level=1.5),
    dict(sparsity_level=float("nan")),
    dict(sparsity_level="0.5"),
    dict(sparse_block_shape=(0, 4)),
    dict(sparse_block_shape=(1,)),
    dict(sparse_block_shape="x"),
    dict(sparse_block_shape=(1, 4, 1)),
    dict(sparse_block_shape=(1.0, 4)),
    dict(sparse_block_shape=(-1, 4)),
    dict(zeros_per_block=5),
    dict(sparse_block_shape=(2, 2), zeros_per_block=5),
    dict(zeros_per_block=-1),
    dict(zeros_per_block=1.5),
]


@pytest.mark.parametrize("kwargs", BAD_ARGS, ids=repr)
def test_bad_args_raise_at_construction(kwargs):
    with pytest.raises(ValueError):
        DataNormSparsifier(**kwargs)


@pytest.mark.parametrize("norm", ["L3", "l1", None, 1])
def test_bad_norm_raises_at_construction(norm):
    with pytest.raises(ValueError, match="norm"):
        DataNormSparsifier(norm=norm)


@pytest.mark.parametrize("kwargs", BAD_ARGS, ids=repr)
def test_bad_args_raise_in_add_data(kwargs):
    sp = DataNormSparsifier()
    sp.add_data("good", torch.randn(4, 8))
    with pytest.raises(ValueError, match=re.escape("bad.name")):
        sp.add_data("bad.name", torch.randn(4, 8), **kwargs)
    assert "bad.name" not in sp.data_groups
    sp.step()  # the sparsifier is still usable
    assert list(sp.data_groups) == ["good"]


def test_bad_config_on_re_add_keeps_the_existing_data():
    data = torch.randn(4, 8)
    sp = DataNormSparsifier()
    sp.add_data("a", data)
    with pytest.warns(UserWarning), pytest.raises(ValueError):
        sp.add_data("a", data, sparsity_level=2.0)
    assert "a" in sp.data_groups
    assert sp.get_mask("a").shape == data.shape


def test_valid_edge_args_are_accepted():
    DataNormSparsifier(sparsity_level=0, sparse_block_shape=[1, 1], zeros_per_block=0)
    DataNormSparsifier(sparsity_level=1, sparse_block_shape=(3, 5), zeros_per_block=15)
    sp = DataNormSparsifier(norm="L2")
    sp.add_data("x", torch.randn(3, 5), zeros_per_block=0, sparsity_level=1)
    sp.step()
    assert sp.get_mask("x").all()  # zero zeros per block keeps everything


def test_invalid_level_set_after_add_raises_at_step():
    sp = DataNormSparsifier()
    sp.add_data("x", torch.randn(4, 8))
    sp.data_groups["x"]["sparsity_level"] = 1.2
    with pytest.raises(ValueError, match="sparsity_level"):
        sp.step()


def test_block_larger_than_data():
    torch.manual_seed(16)
    data = torch.randn(3, 5)
    mask = ours_mask(data, sparsity_level=1.0, sparse_block_shape=(4, 8))
    assert not mask.any()
    mask = ours_mask(data, sparsity_level=0.4, sparse_block_shape=(4, 8))  # round(0.4) == 0
    assert mask.all()
    mask = ours_mask(data, sparsity_level=1.0, sparse_block_shape=(4, 8), zeros_per_block=6)
    assert int((~mask).sum()) == 6
    assert torch.equal(~mask, data.abs() <= data.abs().flatten().sort().values[5])


def test_empty_data():
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("e", torch.empty(0, 4))
    sp.step()
    assert sp.get_mask("e").shape == (0, 4)


# ------------------------------------------------------------ NaN, inf and complex data

NAN, INF = float("nan"), float("inf")


def removed_blocks(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Flat bool over the block grid: True where any entry of the block is zeroed."""
    return ~_per_block(block_ops.as_2d(mask), block, lambda b: b.all(), torch.bool).flatten()


def sort_oracle(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The documented order: torch's stable sort (NaN last, ties by position), first k."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[torch.argsort(scores.flatten(), stable=True)[:k]] = True
    return chosen


def with_nan_blocks(rows: int, cols: int, fraction: float, seed: int) -> tuple:
    """(rows, cols) data, (1, 4) blocks, ``fraction`` of the blocks holding one NaN."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    num_blocks = rows * cols // 4
    nan_blocks = torch.randperm(num_blocks, generator=gen)[: round(fraction * num_blocks)]
    entry = torch.randint(0, 4, (nan_blocks.numel(),), generator=gen)
    data.view(num_blocks, 4)[nan_blocks, entry] = NAN
    is_nan = torch.zeros(num_blocks, dtype=torch.bool)
    is_nan[nan_blocks] = True
    return data, is_nan


@pytest.mark.parametrize(("fraction", "level"), [(0.1, 0.95), (0.5, 0.6)])
def test_nan_blocks_outnumbering_the_rest_are_removed_like_the_reference(fraction, level):
    """The issue's repro: more blocks to remove than NaN-free blocks; it used to remove 0."""
    data, is_nan = with_nan_blocks(100, 400, fraction, seed=40)
    k = round(level * 10_000)
    got = removed_blocks(ours_mask(data, sparsity_level=level), (1, 4))
    expected = removed_blocks(ref_mask(data, sparsity_level=level), (1, 4))
    assert int(got.sum()) == int(expected.sum()) == k
    # both remove every NaN-free block, then NaN blocks: ours the first ones by position
    assert got[~is_nan].all() and expected[~is_nan].all()
    nan_index = is_nan.nonzero().squeeze(1)
    assert torch.equal(got[nan_index], torch.arange(nan_index.numel()) < k - int((~is_nan).sum()))


@pytest.mark.parametrize(("fraction", "level"), [(0.1, 0.5), (0.5, 0.3), (0.1, 0.9)])
def test_nan_blocks_fewer_than_needed_are_kept_and_mask_equals_the_reference(fraction, level):
    data, is_nan = with_nan_blocks(100, 400, fraction, seed=41)
    got = ours_mask(data, sparsity_level=level)
    assert torch.equal(got, ref_mask(data, sparsity_level=level))
    removed = removed_blocks(got, (1, 4))
    assert int(removed.sum()) == round(level * 10_000)
    assert not removed[is_nan].any()


def test_inf_blocks_rank_between_finite_and_nan_like_the_reference():
    gen = torch.Generator().manual_seed(42)
    data = torch.randn(50, 40, generator=gen, dtype=torch.float64)
    blocks = data.view(500, 4)
    kinds = torch.randint(0, 4, (500,), generator=gen)  # 0, 1: finite; 2: +-inf; 3: NaN
    blocks[kinds == 2, 1] = INF
    blocks[(kinds == 2) & (torch.arange(500) % 2 == 0), 2] = -INF  # +inf and -inf together
    blocks[kinds == 3, 0] = NAN
    blocks[kinds == 3, 3] = -INF  # NaN wins over inf
    finite, inf, nan = kinds < 2, kinds == 2, kinds == 3
    for norm in ("L1", "L2"):
        scores = grid_scores(data, (1, 4), norm).flatten()
        assert scores[finite].isfinite().all() and (scores[inf] == INF).all()
        assert scores[nan].isnan().all()
        for level in (0.3, float(finite.sum() + inf.sum() // 2) / 500, 0.9, 1.0 - 1 / 500):
            k = round(level * 500)
            got = removed_blocks(ours_mask(data, sparsity_level=level, norm=norm), (1, 4))
            ref = removed_blocks(ref_mask(data, sparsity_level=level, norm=norm), (1, 4))
            assert int(got.sum()) == int(ref.sum()) == k, (norm, level)
            assert torch.equal(got, sort_oracle(scores, k)), (norm, level)
            # the reference agrees on every block but the order among equal (inf, NaN) ones
            for group in (finite, inf, nan):
                assert int(got[group].sum()) == int(ref[group].sum()), (norm, level)
            assert torch.equal(got[finite], ref[finite])


@pytest.mark.parametrize("level", [0.0, 0.3, 0.5, 1.0])
def test_all_nan_data_removes_the_first_blocks(level):
    data = torch.full((10, 13), NAN)
    block = (2, 3)
    got = removed_blocks(ours_mask(data, sparsity_level=level, sparse_block_shape=block), block)
    k = round(level * got.numel())
    assert torch.equal(got, torch.arange(got.numel()) < k)
    ref = removed_blocks(ref_mask(data, sparsity_level=level, sparse_block_shape=block), block)
    assert int(ref.sum()) == k


def test_nan_and_inf_inside_removed_blocks_zero_real_entries_first():
    """zeros_per_block ranks a block's entries finite < inf < NaN; partial blocks never spend
    a zero on padding, whatever the block holds."""
    data = torch.tensor(
        [
            [NAN, INF, 1.0, -2.0, NAN, NAN, -INF],
            [0.5, NAN, 3.0, 4.0, INF, 6.0, NAN],
            [NAN, 8.0, NAN, -INF, NAN, NAN, NAN],
        ]
    )
    block = (2, 4)
    for zeros in range(1, 9):
        mask = ours_mask(data, sparsity_level=1.0, sparse_block_shape=block, zeros_per_block=zeros)
        for r0, c0 in ((0, 0), (0, 4), (2, 0), (2, 4)):
            tile_mask = mask[r0 : r0 + 2, c0 : c0 + 4]
            tile = data[r0 : r0 + 2, c0 : c0 + 4].flatten()
            assert int((~tile_mask).sum()) == min(zeros, tile.numel()), (zeros, r0, c0)
            order = torch.argsort(tile.abs(), stable=True)  # finite, inf, NaN
            zeroed = torch.zeros(tile.numel(), dtype=torch.bool)
            zeroed[order[:zeros]] = True
            # equal magnitudes may go either way: compare the multiset of magnitudes zeroed
            got = tile.abs()[~tile_mask.flatten()].sort().values
            expected = tile.abs()[zeroed].sort().values
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    # a full block without equal magnitudes: exactly the reference's choice
    full = torch.tensor([[NAN, INF, 1.0, -2.0], [0.5, -3.0, 7.0, -INF]])
    kwargs = dict(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=3)
    assert torch.equal(ours_mask(full, **kwargs), ref_mask(full, **kwargs))


@pytest.mark.parametrize(
    ("n", "nan_count", "level"),
    [
        (1_200_000, 120_000, 0.95),  # the sample sees NaN at the k-th position
        (1_200_000, 120_000, 0.89),  # NaN just above the bracket
        (1_200_000, 5, 0.999999),  # too few NaN for the sample: k still reaches them
        (400_000, 400_000, 0.7),  # all NaN, sampled path
    ],
)
def test_nan_on_the_sampled_path_against_the_sort_oracle(n, nan_count, level):
    gen = torch.Generator().manual_seed(43)
    data = torch.randn(n, generator=gen, dtype=torch.float64)
    data[torch.randperm(n, generator=gen)[:nan_count]] = NAN
    data[torch.randperm(n, generator=gen)[:50]] = INF
    k = round(level * n)
    mask = ours_mask(data, sparsity_level=level, sparse_block_shape=(1, 1))
    assert int((~mask).sum()) == k
    assert torch.equal(~mask, sort_oracle(data.abs(), k))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("zeros", [None, 2])
def test_complex_l1_ranks_by_magnitude_like_the_reference(dtype, zeros):
    gen = torch.Generator().manual_seed(44)
    data = torch.randn(30, 21, generator=gen, dtype=dtype)
    for level in (0.2, 0.5, 0.9):
        kwargs = dict(sparsity_level=level, sparse_block_shape=(2, 4), zeros_per_block=zeros)
        got = ours_mask(data, **kwargs)
        assert torch.equal(got, ref_mask(data, **kwargs))
        # the imaginary part counts: real parts alone rank differently
        assert not torch.equal(got, ours_mask(data.real.contiguous(), **kwargs))
        assert int(removed_blocks(got, (2, 4)).sum()) == round(level * 15 * 6)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_l2_ranks_by_squared_magnitude(dtype):
    """The reference cannot do L2 on complex data; its L1 on |x|**2 is the same ranking."""
    gen = torch.Generator().manual_seed(45)
    data = torch.randn(30, 21, generator=gen, dtype=dtype)
    squared = torch.view_as_real(data).double().square().sum(-1)
    for level, zeros in ((0.3, None), (0.7, 3)):
        kwargs = dict(sparsity_level=level, sparse_block_shape=(2, 4), zeros_per_block=zeros)
        got = ours_mask(data, norm="L2", **kwargs)
        assert torch.equal(got, ref_mask(squared, norm="L1", **kwargs))
        assert int(removed_blocks(got, (2, 4)).sum()) == round(level * 15 * 6)
    with pytest.raises(NotImplementedError):  # so the comparison above is the one to make
        ref_mask(data, sparsity_level=0.5, norm="L2")


def test_complex_with_nan_and_large_data():
    gen = torch.Generator().manual_seed(46)
    data = torch.randn(200_000, 8, generator=gen, dtype=torch.complex128)
    data[::7, 3] = complex(0.0, NAN)
    squared = torch.view_as_real(data).square().sum(-1)
    for norm, magnitude in (("L1", data.abs()), ("L2", squared)):
        mask = ours_mask(data, sparsity_level=0.9, sparse_block_shape=(1, 4), norm=norm)
        scores = magnitude.view(-1, 4).sum(1)  # full (1, 4) blocks: sums rank as means
        k = round(0.9 * scores.numel())
        removed = ~mask.view(-1, 4)
        assert torch.equal(removed, removed[:, :1].expand(-1, 4))  # whole blocks
        assert torch.equal(removed[:, 0], sort_oracle(scores, k))


@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0), (1, 0), (0, 1, 3)])
def test_data_without_entries_removes_nothing(shape):
    mask = ours_mask(torch.empty(shape), sparsity_level=0.7, sparse_block_shape=(2, 2))
    assert mask.shape == shape


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_complex_with_an_infinite_part_ranks_as_inf_even_beside_nan(norm):
    """|inf + NaN j| is inf (torch.abs, C99's cabs): such a block goes before a NaN one,
    for L2 as for L1, where the reference agrees."""
    data = torch.tensor(
        [complex(NAN, 0.0), complex(-INF, NAN), complex(1.0, 1.0), complex(NAN, INF)]
    )
    for level, expected in ((0.25, [1, 1, 0, 1]), (0.5, [1, 0, 0, 1]), (0.75, [1, 0, 0, 0])):
        kwargs = dict(sparsity_level=level, sparse_block_shape=(1, 1), norm=norm)
        assert ours_mask(data, **kwargs).int().tolist() == expected, level
        if norm == "L1":
            assert ref_mask(data, **kwargs).int().tolist() == expected, level
