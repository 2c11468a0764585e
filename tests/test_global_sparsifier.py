"""scope="global": one threshold over every name, for MagnitudeSparsifier and
DataNormSparsifier -- prune.global_unstructured's masks, block scores across names, exact
totals, ties across names, and no concatenation of the data."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from sparsify_exp import (
    ConfigValueError,
    DataNormSparsifier,
    LinearScheduler,
    MagnitudeSparsifier,
    NMSparsifier,
    RandomSparsifier,
    RowSparsifier,
)
from sparsify_exp.sparsifier import select

NAN, INF = float("nan"), float("inf")


def global_masks(cls, tensors: dict, level: float, **kwargs) -> dict[str, torch.Tensor]:
    sp = cls(sparsity_level=level, scope="global", **kwargs)
    for name, data in tensors.items():
        sp.add_data(name, data)
    sp.step()
    return {name: sp.get_mask(name).clone() for name in tensors}


def global_unstructured(tensors: dict, level: float) -> dict[str, torch.Tensor]:
    modules = {}
    for name, data in tensors.items():
        module = nn.Module()
        module.weight = nn.Parameter(data.detach().clone())
        modules[name] = module
    prune.global_unstructured(
        [(m, "weight") for m in modules.values()],
        pruning_method=prune.L1Unstructured,
        amount=level,
    )
    return {name: m.weight_mask.bool() for name, m in modules.items()}


def layers(seed: int, shapes, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Tensors of different scales, so a global threshold takes different fractions."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"model.layer{i}.weight": torch.randn(shape, generator=gen, dtype=dtype) * (i + 1)
        for i, shape in enumerate(shapes)
    }


SHAPES = [[(10, 5), (7,), (3, 2, 4)], [(40, 70), (100,), (60, 30), (2, 2)]]
VARIANTS = [
    (MagnitudeSparsifier, {}),
    (DataNormSparsifier, dict(sparse_block_shape=(1, 1))),
    (DataNormSparsifier, dict(sparse_block_shape=(1, 1), norm="L2")),
]


@pytest.mark.parametrize(("cls", "kwargs"), VARIANTS, ids=["magnitude", "norm-L1", "norm-L2"])
@pytest.mark.parametrize("shapes", SHAPES, ids=["small", "mixed"])
@pytest.mark.parametrize("level", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_matches_global_unstructured(cls, kwargs, shapes, level):
    tensors = layers(1, shapes)
    expected = global_unstructured(tensors, level)
    got = global_masks(cls, tensors, level, **kwargs)
    for name in tensors:
        assert torch.equal(got[name], expected[name]), name
    removed = sum(int((~m).sum()) for m in got.values())
    assert removed == round(level * sum(t.numel() for t in tensors.values()))
    if 0 < level < 1:  # one threshold: the fractions differ between names
        fractions = {round(float((~m).float().mean()), 3) for m in got.values()}
        assert len(fractions) > 1


@pytest.mark.parametrize("cls", [MagnitudeSparsifier, DataNormSparsifier])
def test_matches_global_unstructured_on_the_sampled_path(cls):
    """More entries in all than select.SMALL_KEYS (each name below it, too)."""
    tensors = layers(2, [(300, 400), (250, 500), (90_000,)], dtype=torch.float64)
    assert sum(t.numel() for t in tensors.values()) > select.SMALL_KEYS
    kwargs = {"sparse_block_shape": (1, 1)} if cls is DataNormSparsifier else {}
    for level in (0.3, 0.9):
        expected = global_unstructured(tensors, level)
        got = global_masks(cls, tensors, level, **kwargs)
        for name in tensors:
            assert torch.equal(got[name], expected[name]), (level, name)


def test_embedding_bags_and_mixed_dtypes():
    torch.manual_seed(3)
    tables = {"tables.user": nn.EmbeddingBag(200, 16), "tables.item": nn.Embedding(300, 8)}
    weights = {n: t.weight.detach().clone() for n, t in tables.items()}
    extra = {"head.weight": torch.randn(20, 30, dtype=torch.float64)}
    sp = MagnitudeSparsifier(sparsity_level=0.7, scope="global")
    for name, table in tables.items():
        sp.add_data(name, table)
    sp.add_data("head.weight", extra["head.weight"])
    sp.step()
    expected = global_unstructured({**weights, **extra}, 0.7)
    for name in expected:
        assert torch.equal(sp.get_mask(name), expected[name]), name
    sp.squash_mask()
    for name, table in tables.items():
        assert torch.equal(table.weight.detach(), weights[name] * expected[name])


def _mean_scores(data: torch.Tensor, block, norm: str = "L1") -> torch.Tensor:
    """Float64 block means of |x| (L1) or x**2 (L2) over the documented 2-D view (partial
    blocks: valid entries only), row-major."""
    squeezed = data.squeeze()
    d2 = squeezed.reshape(1, -1) if squeezed.dim() <= 1 else squeezed.reshape(squeezed.shape[0], -1)
    height, width = d2.shape
    bh, bw = block
    rows, cols = math.ceil(height / bh), math.ceil(width / bw)
    out = torch.empty(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            values = d2[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw].double().abs()
            out[r, c] = (values if norm == "L1" else values.square()).mean()
    return out


def _removed_blocks(mask: torch.Tensor, block) -> torch.Tensor:
    squeezed = mask.squeeze()
    m2 = squeezed.reshape(1, -1) if squeezed.dim() <= 1 else squeezed.reshape(squeezed.shape[0], -1)
    height, width = m2.shape
    bh, bw = block
    rows, cols = math.ceil(height / bh), math.ceil(width / bw)
    out = torch.empty(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = not m2[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw].all()
    return out


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_blocks_rank_by_their_mean_across_names_and_block_shapes(norm):
    gen = torch.Generator().manual_seed(4)
    tensors = {
        "a": torch.randn(12, 16, generator=gen, dtype=torch.float64),
        "b.weight": torch.randn(9, 10, generator=gen, dtype=torch.float64) * 2,  # partial blocks
        "c": torch.randn(40, generator=gen, dtype=torch.float64) * 0.5,
        "d": torch.randn(30, 11, generator=gen, dtype=torch.float64).t() * 0.8,  # (1, 1) blocks
    }
    blocks = {"a": (1, 4), "b.weight": (2, 3), "c": (1, 4), "d": (1, 1)}
    zeros = {"a": None, "b.weight": 2, "c": None, "d": None}
    for level in (0.25, 0.5, 0.85):
        sp = DataNormSparsifier(sparsity_level=level, scope="global", norm=norm)
        for name, data in tensors.items():
            sp.add_data(name, data, sparse_block_shape=blocks[name], zeros_per_block=zeros[name])
        sp.step()
        scores = torch.cat([_mean_scores(t, blocks[n], norm).flatten() for n, t in tensors.items()])
        removed = torch.cat([_removed_blocks(sp.get_mask(n), blocks[n]).flatten() for n in tensors])
        k = round(level * scores.numel())
        expected = torch.zeros(scores.numel(), dtype=torch.bool)
        expected[torch.argsort(scores, stable=True)[:k]] = True
        assert torch.equal(removed, expected), level
        # a removed block of "b.weight" loses its 2 smallest entries, a partial one min(2, n)
        assert int((~sp.get_mask("b.weight")).sum()) == 2 * int(
            _removed_blocks(sp.get_mask("b.weight"), (2, 3)).sum()
        )


@pytest.mark.parametrize("cls", [MagnitudeSparsifier, DataNormSparsifier])
def test_ties_across_names_go_by_name_order_then_position(cls):
    tensors = {"first": torch.zeros(5, 4), "second": torch.zeros(3, 4), "third": torch.ones(4)}
    kwargs = {"sparse_block_shape": (1, 1)} if cls is DataNormSparsifier else {}
    for level, first, second in ((0.25, 9, 0), (0.5, 18, 0), (0.75, 20, 7)):
        got = global_masks(cls, tensors, level, **kwargs)
        assert int((~got["first"]).sum()) == first
        assert not got["first"].view(-1)[:first].any()
        assert int((~got["second"]).sum()) == second
        assert not got["second"].view(-1)[:second].any()
        assert got["third"].all()


def test_nan_entries_are_removed_last_across_names():
    tensors = {
        "a": torch.tensor([NAN, 1.0, 2.0, INF]),
        "b": torch.tensor([0.5, NAN, -INF, 3.0]),
    }
    # removed in this order: 0.5, 1, 2, 3, then inf (a's before b's -inf), then NaN (a's first)
    expected = {
        3: ([1, 0, 0, 1], [0, 1, 1, 1]),
        4: ([1, 0, 0, 1], [0, 1, 1, 0]),
        5: ([1, 0, 0, 0], [0, 1, 1, 0]),
        6: ([1, 0, 0, 0], [0, 1, 0, 0]),
        7: ([0, 0, 0, 0], [0, 1, 0, 0]),
        8: ([0, 0, 0, 0], [0, 0, 0, 0]),
    }
    for k, (a, b) in expected.items():
        got = global_masks(MagnitudeSparsifier, tensors, k / 8)
        assert (got["a"].int().tolist(), got["b"].int().tolist()) == (a, b), k


def test_the_data_is_never_concatenated(monkeypatch):
    """A global step concatenates samples and candidates, never the data."""
    sizes = []
    cat = torch.cat

    def recording_cat(tensors, *args, **kwargs):
        out = cat(tensors, *args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(select.torch, "cat", recording_cat)
    tensors = layers(5, [(1000, 800), (700, 600), (600_000,)])
    total = sum(t.numel() for t in tensors.values())
    for cls in (MagnitudeSparsifier, DataNormSparsifier):
        kwargs = {"sparse_block_shape": (1, 1)} if cls is DataNormSparsifier else {}
        global_masks(cls, tensors, 0.6, **kwargs)
    # the sample (at most 2 * SAMPLE_SIZE keys) and the candidates near the threshold
    assert sizes and max(sizes) <= 2 * select.SAMPLE_SIZE < total // 5


def test_names_need_one_level():
    sp = MagnitudeSparsifier(sparsity_level=0.5, scope="global")
    sp.add_data("a", torch.randn(10))
    sp.add_data("b", torch.randn(10), sparsity_level=0.3)
    with pytest.raises(ConfigValueError, match="scope=global") as info:
        sp.step()
    assert info.value.key == "sparsity_level"


def test_a_scheduler_drives_the_global_level():
    tensors = layers(6, [(30, 20), (50,)])
    sp = MagnitudeSparsifier(sparsity_level=0.8, scope="global")
    for name, data in tensors.items():
        sp.add_data(name, data)
    scheduler = LinearScheduler(sp, schedule_param="sparsity_level", total_steps=4)
    total = sum(t.numel() for t in tensors.values())
    for _ in range(5):
        sp.step()
        level = next(iter(sp.data_groups.values()))["sparsity_level"]
        removed = sum(int((~sp.get_mask(n)).sum()) for n in tensors)
        assert removed == round(level * total)
        scheduler.step()


def test_squashed_names_leave_the_pool():
    tensors = layers(7, [(10, 10), (20, 5)])
    sp = MagnitudeSparsifier(sparsity_level=0.5, scope="global")
    for name, data in tensors.items():
        sp.add_data(name, data.clone())
    sp.step()
    first, second = list(tensors)
    sp.squash_mask(names=[first])
    before = sp.get_mask(first).clone()
    sp.step()
    assert torch.equal(sp.get_mask(first), before)
    assert int((~sp.get_mask(second)).sum()) == 50


def test_state_dict_round_trip_and_pickle_keep_the_scope():
    import pickle

    tensors = layers(8, [(10, 10), (20, 5)])
    sp = DataNormSparsifier(sparsity_level=0.4, sparse_block_shape=(1, 2), scope="global")
    for name, data in tensors.items():
        sp.add_data(name, data)
    sp.step()
    buffer = io.BytesIO()
    torch.save(sp.state_dict(), buffer)
    buffer.seek(0)
    loaded = DataNormSparsifier(scope="global")
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    loaded.step()
    copied = pickle.loads(pickle.dumps(sp))
    assert copied.scope == "global"
    copied.step()
    for name in tensors:
        assert torch.equal(loaded.get_mask(name), sp.get_mask(name))
        assert torch.equal(copied.get_mask(name), sp.get_mask(name))


def test_local_scope_is_the_default_and_unchanged():
    tensors = layers(9, [(10, 10), (20, 5)])
    sp = MagnitudeSparsifier(sparsity_level=0.5)
    assert sp.scope == "local"
    for name, data in tensors.items():
        sp.add_data(name, data)
    sp.step()
    assert all(int((~sp.get_mask(n)).sum()) == 50 for n in tensors)


@pytest.mark.parametrize(
    "make",
    [
        lambda: NMSparsifier(scope="global"),
        lambda: RowSparsifier(scope="global"),
        lambda: RandomSparsifier(scope="global"),
    ],
    ids=["nm", "row", "random"],
)
def test_sparsifiers_without_a_global_form_refuse_it(make):
    with pytest.raises(ConfigValueError, match="no global form") as info:
        make()
    assert (info.value.key, info.value.value) == ("scope", "global")
