"""RandomSparsifier: exact counts, the same mask for the same seed (any process, layout or
chunking), unrelated masks across seeds and names, a spread-out choice, checkpoints and
config errors."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from sparsify_exp import ConfigValueError, RandomSparsifier
from sparsify_exp.sparsifier import random_mask, select

_M32 = (1 << 32) - 1


def ours(data, level: float = 0.5, seed: int = 0, name: str = "x") -> torch.Tensor:
    sp = RandomSparsifier(sparsity_level=level, seed=seed)
    sp.add_data(name, data)
    sp.step()
    return sp.get_mask(name).clone()


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def reference_key(position: int, salt: tuple[int, int]) -> int:
    """The documented key, in plain Python integers."""
    h = _lowbias32(((position & _M32) + salt[0]) & _M32)
    h ^= ((position >> 32) * 0x9E3779B9 + salt[1]) & _M32
    return _lowbias32(h) & 0x7FFF_FFFF


def test_keys_are_the_documented_hash_for_chunks_and_any_position():
    salt = random_mask.name_salt(3, "emb.weight")
    assert salt == random_mask.name_salt(3, "emb.weight") != random_mask.name_salt(4, "emb.weight")
    source = random_mask.RandomKeys(2_200_000, salt, torch.device("cpu"))
    keys = torch.cat([chunk.clone() for _, chunk in source.chunks()])
    for position in (0, 1, 12345, 1_048_575, 1_048_576, 2_199_999):
        assert int(keys[position]) == reference_key(position, salt)
    far = [5, 2**31 + 7, 2**32 + 7, 2**33 + 2**31 + 3, 2**40 - 1]
    got = source.keys_at(torch.tensor(far)).tolist()
    assert got == [reference_key(p, salt) for p in far]
    assert torch.equal(source.keys_at(torch.arange(2_200_000)), keys)


def test_the_salt_does_not_depend_on_the_process():
    code = "from sparsify_exp.sparsifier.random_mask import name_salt; print(name_salt(7, 'a.b'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == str(random_mask.name_salt(7, "a.b"))


@pytest.mark.parametrize("n", [1, 7, 1000, 1_500_000])
@pytest.mark.parametrize("level", [0.0, 0.1, 0.5, 0.8, 1.0])
def test_removes_exactly_round_level_numel(n, level):
    mask = ours(torch.empty(n), level, seed=11)
    assert int((~mask).sum()) == round(level * n)


def test_the_lowest_keys_go():
    n = 300_000
    source = random_mask.RandomKeys(n, random_mask.name_salt(5, "x"), torch.device("cpu"))
    keys = torch.cat([chunk.clone() for _, chunk in source.chunks()])
    expected = torch.ones(n, dtype=torch.bool)
    expected[torch.argsort(keys, stable=True)[: round(0.3 * n)]] = False
    assert torch.equal(ours(torch.empty(n), 0.3, seed=5), expected)


def test_same_seed_same_mask_whatever_the_data_and_layout():
    base = torch.randn(300, 500)
    mask = ours(base, 0.6, seed=3, name="layer.0.weight")
    assert torch.equal(mask, ours(torch.zeros(300, 500), 0.6, seed=3, name="layer.0.weight"))
    view = torch.randn(500, 300).t()  # non-contiguous data of the same shape
    assert torch.equal(mask, ours(view, 0.6, seed=3, name="layer.0.weight"))
    sp = RandomSparsifier(sparsity_level=0.6, seed=3)
    sp.add_data("layer.0.weight", base)
    sp.step()
    sp.step()
    assert torch.equal(sp.get_mask("layer.0.weight"), mask)


def test_seeds_and_names_give_unrelated_masks():
    data = torch.empty(200, 100)
    masks = [ours(data, 0.5, seed=s, name=n) for s in (0, 1) for n in ("a", "b")]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            agreement = float((masks[i] == masks[j]).float().mean())
            assert 0.45 < agreement < 0.55, (i, j, agreement)  # as independent coins


def test_the_choice_is_spread_out():
    """Every stretch of the data, rows and columns alike, loses about the level."""
    mask = ours(torch.empty(2000, 500), 0.8, seed=9)
    removed = (~mask).float()
    for fractions in (removed.mean(1), removed.mean(0), removed.view(-1, 10_000).mean(1)):
        # 4.5 standard deviations of a binomial fraction
        spread = 4.5 * (0.16 / (mask.numel() / fractions.numel())) ** 0.5
        assert float((fractions - 0.8).abs().max()) < spread
    # consecutive entries are not correlated
    flat = removed.view(-1)
    agreement = float((flat[1:] == flat[:-1]).float().mean())
    assert abs(agreement - (0.8**2 + 0.2**2)) < 0.005


def test_an_off_bracket_falls_back_to_the_exact_selection(monkeypatch):
    mask = ours(torch.empty(700_000), 0.4, seed=2)
    monkeypatch.setattr(random_mask, "_bracket", lambda numel, k: (0, 1))  # far too low
    assert torch.equal(ours(torch.empty(700_000), 0.4, seed=2), mask)
    monkeypatch.setattr(select, "_bracket", lambda *args: (1, 0))  # and no sample either
    assert torch.equal(ours(torch.empty(700_000), 0.4, seed=2), mask)


def test_counts_match_torchs_random_unstructured():
    module = nn.Linear(40, 30)
    prune.random_unstructured(module, "weight", amount=0.35)
    assert int((~ours(torch.empty(30, 40), 0.35)).sum()) == int((module.weight_mask == 0).sum())


def test_embedding_bag_and_nan_data():
    bag = nn.EmbeddingBag(500, 8)
    with torch.no_grad():
        bag.weight[::3] = float("nan")
    original = bag.weight.detach().clone()
    sp = RandomSparsifier(sparsity_level=0.25, seed=4)
    sp.add_data("tables.item", bag)
    sp.step()
    mask = sp.get_mask("tables.item").clone()
    assert int((~mask).sum()) == 1000
    assert torch.equal(mask, ours(torch.zeros(500, 8), 0.25, seed=4, name="tables.item"))
    sp.squash_mask()
    expected = torch.where(mask, original, 0.0)
    assert torch.equal(bag.weight.detach().isnan(), expected.isnan())


def test_state_dict_round_trip_keeps_the_seed():
    sp = RandomSparsifier(sparsity_level=0.5, seed=21)
    sp.add_data("a.weight", torch.randn(20, 20))
    sp.add_data("b", torch.randn(50), seed=22, sparsity_level=0.1)
    sp.step()
    buffer = io.BytesIO()
    torch.save(sp.state_dict(), buffer)
    buffer.seek(0)
    loaded = RandomSparsifier()
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.data_groups["b"]["seed"] == 22
    loaded.step()
    for name in ("a.weight", "b"):
        assert torch.equal(loaded.get_mask(name), sp.get_mask(name))


def test_edge_shapes():
    for shape in [(), (0,), (0, 3), (1, 1)]:
        mask = ours(torch.ones(shape), 1.0)
        assert mask.shape == shape and not mask.any()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed=True), "seed"),
        (dict(seed="0"), "seed"),
        (dict(sparsity_level=1.01), "sparsity_level"),
        (dict(scope="global"), "scope"),
    ],
    ids=repr,
)
def test_bad_arguments_are_config_value_errors(kwargs, key):
    with pytest.raises(ConfigValueError) as info:
        RandomSparsifier(**kwargs)
    assert info.value.key == key
    if key != "scope":
        sp = RandomSparsifier()
        with pytest.raises(ConfigValueError, match=r"'enc\.w'"):
            sp.add_data("enc.w", torch.ones(3), **kwargs)
