"""NMSparsifier: torch's reference 2:4 masks, exactly m - n zeros a group, ties and NaN,
shapes that do not tile, config errors, and the 2:4 layout sparse tensor cores accept."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.data_sparsifier import (
    DataNormSparsifier as RefDataNorm,
)

from sparsify_exp import ConfigValueError, NMSparsifier

NAN, INF = float("nan"), float("inf")


def ours(data: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    sp = NMSparsifier(n=n, m=m)
    sp.add_data("x", data)
    sp.step()
    mask = sp.get_mask("x")
    assert mask.shape == data.shape and mask.dtype == torch.bool
    return mask.clone()


def reference(data: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """torch's own N:M: its DataNormSparsifier at level 1 with (1, m) blocks."""
    sp = RefDataNorm(sparsity_level=1.0, sparse_block_shape=(1, m), zeros_per_block=m - n)
    sp.add_data("x", data.clone())
    sp.step()
    return sp.get_mask("x").bool().reshape(data.shape)


def oracle(data: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group, the m - n first entries of a stable sort of |x| (NaN last) are removed."""
    groups = data.abs().reshape(-1, m)
    keep = torch.ones(groups.shape, dtype=torch.bool)
    keep.scatter_(1, torch.argsort(groups, dim=1, stable=True)[:, : m - n], False)
    return keep.view(data.shape)


CASES = [
    (n, m, shape)
    for n, m in [(2, 4), (1, 4), (3, 4), (1, 2), (4, 8), (2, 8), (5, 20)]
    for shape in [(8, 16), (3, 40), (64, 160)]
    if shape[-1] % m == 0
]


@pytest.mark.parametrize(("n", "m", "shape"), CASES)
def test_matches_torchs_reference(n, m, shape):
    data = torch.randn(shape, generator=torch.Generator().manual_seed(n * 100 + m))
    assert torch.equal(ours(data, n, m), reference(data, n, m))


def test_two_of_four_on_an_embedding_bag_larger_than_a_chunk():
    torch.manual_seed(1)
    bag = nn.EmbeddingBag(20_000, 64)
    original = bag.weight.detach().clone()
    sp = NMSparsifier()
    sp.add_data("tables.item.weight", bag)
    sp.step()
    mask = sp.get_mask("tables.item.weight").clone()
    assert torch.equal(mask, oracle(original, 2, 4))
    assert torch.equal((~mask).view(-1, 4).sum(1), torch.full((320_000,), 2))
    sp.squash_mask()
    assert torch.equal(bag.weight.detach(), original * mask)


@pytest.mark.parametrize("m", [4, 24])  # pairwise ranks, and the sort for large groups
def test_ties_go_by_position_and_nan_is_kept_first(m):
    zeros = torch.zeros(3, 2 * m)
    mask = ours(zeros, 1, m).view(-1, m)
    assert torch.equal(mask, (torch.arange(m) == m - 1).expand_as(mask))  # the last one kept
    row = torch.tensor([NAN, 1.0, -INF, 0.5] + [0.0] * (m - 4))
    data = torch.stack([row, row.flip(0)])
    for n in range(m + 1):
        assert torch.equal(ours(data, n, m), oracle(data, n, m)), n
    # NaN first, then inf, then the largest finite
    assert ours(row[None], 1, m).view(-1).tolist() == [True] + [False] * (m - 1)
    assert ours(row[None], 2, m).view(-1)[:4].tolist() == [True, False, True, False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.complex64])
def test_dtypes_and_layouts(dtype):
    base = torch.randn(24, 33, generator=torch.Generator().manual_seed(2)).to(dtype)
    for data in (base[:, 1:], base.t()[1:].t(), base[::2, :32]):
        assert torch.equal(ours(data), oracle(data, 2, 4)), data.stride()


def test_non_contiguous_data_larger_than_a_chunk():
    base = torch.randn(2100, 1000, generator=torch.Generator().manual_seed(3))
    view = base[:, :512]  # rows of a wider table
    assert torch.equal(ours(view), oracle(view, 2, 4))


def test_every_group_loses_exactly_m_minus_n():
    gen = torch.Generator().manual_seed(4)
    data = torch.randint(0, 3, (50, 24), generator=gen).float()  # many ties
    data[data == 2] = NAN
    for n, m in [(2, 4), (1, 3), (5, 6), (0, 4), (4, 4), (7, 8)]:
        mask = ours(data, n, m)
        assert torch.equal((~mask).view(-1, m).sum(1), torch.full((50 * 24 // m,), m - n))
        assert torch.equal(mask, oracle(data, n, m))


def test_edge_shapes():
    assert ours(torch.ones(0, 4)).shape == (0, 4)
    assert ours(torch.tensor(3.0), 1, 1).item() is True
    assert ours(torch.tensor(3.0), 0, 1).item() is False
    assert ours(torch.ones(1, 1, 8)).view(-1).tolist() == [False, False, True, True] * 2


# -------------------------------------------------------------------- shape checks


def test_a_last_dimension_groups_do_not_tile_is_an_error_naming_the_data():
    sp = NMSparsifier()
    sp.add_data("ok", torch.randn(4, 8))
    with pytest.raises(ConfigValueError, match=r"'net\.0\.bias'.*last dimension \(10\)") as info:
        sp.add_data("net.0.bias", torch.randn(10))
    assert (info.value.key, info.value.value, info.value.name) == ("m", 4, "net.0.bias")
    assert "net.0.bias" not in sp.data_groups
    with pytest.raises(ConfigValueError, match="'scalar'"):
        sp.add_data("scalar", torch.tensor(1.0))
    sp.add_data("net.0.bias", torch.randn(10), m=5, n=1)  # a per-name m that divides it
    sp.step()
    assert int((~sp.get_mask("net.0.bias")).sum()) == 8
    assert set(sp.data_groups) == {"ok", "net.0.bias"}


def test_an_m_changed_after_add_data_is_checked_at_step():
    sp = NMSparsifier()
    sp.add_data("w", torch.randn(4, 8))
    sp.data_groups["w"]["m"] = 3
    with pytest.raises(ConfigValueError, match="'w'"):
        sp.step()


BAD = [
    (dict(n=5, m=4), "n"),
    (dict(n=-1), "n"),
    (dict(n=2.0), "n"),
    (dict(n=True), "n"),
    (dict(m=0), "m"),
    (dict(m=-4), "m"),
    (dict(m="4"), "m"),
    (dict(m=None), "m"),
]


@pytest.mark.parametrize(("kwargs", "key"), BAD, ids=repr)
def test_bad_n_and_m_are_config_value_errors(kwargs, key):
    with pytest.raises(ConfigValueError) as info:
        NMSparsifier(**kwargs)
    assert info.value.key == key
    sp = NMSparsifier()
    with pytest.raises(ConfigValueError, match=r"'layer\.1\.weight'") as info:
        sp.add_data("layer.1.weight", torch.randn(4, 8), **kwargs)
    assert info.value.key == key and not sp.data_groups


def test_state_dict_round_trip():
    torch.manual_seed(5)
    sp = NMSparsifier()
    sp.add_data("encoder.layer.0.weight", torch.randn(16, 32))
    sp.add_data("emb", nn.Embedding(40, 12), n=1, m=3)
    sp.step()
    buffer = io.BytesIO()
    torch.save(sp.state_dict(), buffer)
    buffer.seek(0)
    loaded = NMSparsifier()
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.data_groups == sp.data_groups
    loaded.step()
    for name in sp.data_groups:
        assert torch.equal(loaded.get_mask(name), sp.get_mask(name))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_two_of_four_fp16_weight_converts_to_semi_structured():
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(6)
    linear = nn.Linear(128, 128, bias=False).half().cuda()
    sp = NMSparsifier(n=2, m=4)
    sp.add_data("linear.weight", linear.weight)
    sp.step()
    sp.squash_mask()
    weight = linear.weight.detach()
    assert bool(((weight.view(-1, 4) != 0).sum(1) <= 2).all())
    try:
        sparse = to_sparse_semi_structured(weight)
    except RuntimeError as error:  # e.g. a GPU without sparse tensor cores
        pytest.skip(f"semi-structured sparsity unavailable here: {error}")
    assert torch.equal(sparse.to_dense(), weight)
    x = torch.randn(128, 64, dtype=torch.float16, device="cuda")
    torch.testing.assert_close(torch.mm(sparse, x), torch.mm(weight, x), rtol=1e-2, atol=1e-2)
