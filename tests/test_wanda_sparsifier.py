"""WandaSparsifier: the paper's per-row masks (and llmcompressor's rounding), N:M groups, per
tensor and global ranking, schedules, packed masks, state_dict, non-finite data, bad config."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

from sparsify_exp import (
    ConfigValueError,
    LinearScheduler,
    MagnitudeSparsifier,
    WandaSparsifier,
    collect,
)
from sparsify_exp.sparsifier.packed_mask import PackedMask

NAN, INF = float("nan"), float("inf")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ours(data, norms, **kwargs) -> torch.Tensor:
    sp = WandaSparsifier(**kwargs)
    sp.add_data("w", data, input_norms=norms)
    sp.step()
    return sp.get_mask("w").clone()


def reference_rows(data: torch.Tensor, norms: torch.Tensor, level: float) -> torch.Tensor:
    """locuslab/wanda ``prune_wanda`` and llmcompressor ``sparsify_weight``: a stable sort of
    ``|W| * norm`` per row, the first ``int(columns * level)`` removed."""
    metric = data.abs().float() * norms.float().reshape(1, -1)
    keep = torch.ones_like(metric, dtype=torch.bool)
    order = torch.sort(metric, dim=-1, stable=True).indices[:, : int(metric.shape[1] * level)]
    keep.scatter_(1, order, False)
    return keep


def reference_nm(data: torch.Tensor, norms: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The same references' N:M: in each group of m columns the m - n smallest removed."""
    metric = data.abs().float() * norms.float().reshape(1, -1)
    keep = torch.ones_like(metric, dtype=torch.bool)
    for start in range(0, metric.shape[1], m):
        smallest = torch.topk(metric[:, start : start + m], m - n, dim=1, largest=False)[1]
        keep.scatter_(1, start + smallest, False)
    return keep


@pytest.mark.parametrize("shape", [(4, 8), (37, 64), (300, 128), (3, 1000)])
@pytest.mark.parametrize("level", [0.0, 0.3, 0.5, 0.55, 0.9, 1.0])
def test_per_row_masks_are_the_papers(shape, level):
    data = torch.randn(shape, generator=gen(1))
    norms = torch.rand(shape[1], generator=gen(2)) * 5
    mask = ours(data, norms, sparsity_level=level)
    assert torch.equal(mask, reference_rows(data, norms, level))
    # every row loses the same count, rounded down
    assert torch.equal((~mask).sum(1), torch.full((shape[0],), int(level * shape[1])))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2)])
def test_nm_masks_are_the_papers(n, m):
    data = torch.randn(64, 32, generator=gen(3))
    norms = torch.rand(32, generator=gen(4)) + 0.1
    mask = ours(data, norms, n=n, m=m)
    assert torch.equal(mask, reference_nm(data, norms, n, m))
    assert torch.equal(mask.view(64, -1, m).sum(-1), torch.full((64, 32 // m), n))


def test_nm_edge_patterns():
    data = torch.randn(4, 8, generator=gen(5))
    norms = torch.ones(8)
    assert bool(ours(data, norms, n=4, m=4).all())
    assert not bool(ours(data, norms, n=0, m=4).any())


def test_the_score_is_the_weight_times_the_feature_norm():
    # column 0 holds the largest weights but its feature is silent: Wanda removes it first,
    # magnitude keeps it
    data = torch.tensor([[10.0, 1.0, 2.0, 3.0], [9.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([0.01, 1.0, 1.0, 1.0])
    mask = ours(data, norms, sparsity_level=0.25)
    assert torch.equal(mask[:, 0], torch.tensor([False, False]))
    assert bool(mask[:, 1:].sum() == 6)


def test_equal_norms_give_magnitude_masks_and_any_common_factor_is_the_same():
    data = torch.randn(50, 40, generator=gen(6))
    norms = torch.rand(40, generator=gen(7))
    magnitude = MagnitudeSparsifier(sparsity_level=0.4)
    magnitude.add_data("w", data)
    magnitude.step()
    by_tensor = ours(data, torch.full((40,), 3.0), sparsity_level=0.4, compare="tensor")
    assert torch.equal(by_tensor, magnitude.get_mask("w"))
    for kwargs in ({"sparsity_level": 0.5}, {"n": 2, "m": 4}, {"compare": "tensor"}):
        assert torch.equal(ours(data, norms, **kwargs), ours(data, norms * 8.0, **kwargs))


def test_per_tensor_and_global_rank_the_scores_as_magnitude_ranks_entries():
    datas = {
        "a": torch.randn(30, 20, generator=gen(8)),
        "b": torch.randn(10, 50, generator=gen(9)) * 3,
    }
    norms = {"a": torch.rand(20, generator=gen(10)), "b": torch.rand(50, generator=gen(11))}
    scores = {name: datas[name].abs() * norms[name] for name in datas}
    for scope in ("local", "global"):
        wanda = WandaSparsifier(sparsity_level=0.6, compare="tensor", scope=scope)
        magnitude = MagnitudeSparsifier(sparsity_level=0.6, scope=scope)
        for name in datas:
            wanda.add_data(name, datas[name], input_norms=norms[name])
            magnitude.add_data(name, scores[name])
        wanda.step()
        magnitude.step()
        for name in datas:
            assert torch.equal(wanda.get_mask(name), magnitude.get_mask(name)), (scope, name)
    removed = [int((~wanda.get_mask(n)).sum()) for n in datas]
    assert sum(removed) == round(0.6 * 1100) and removed[0] != round(0.6 * 600)


def test_wanda_keeps_outputs_closer_than_magnitude_on_skewed_features():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32, bias=False)
    scale = torch.logspace(-2, 1, 64)  # features from quiet to loud
    batches = [torch.randn(16, 64) * scale for _ in range(8)]
    held_out = torch.randn(256, 64) * scale
    dense = layer(held_out).detach()
    stats = collect(layer, batches, needs=("input_norms",))
    errors = {}
    for name, sp in (
        ("wanda", WandaSparsifier(sparsity_level=0.5)),
        ("magnitude", MagnitudeSparsifier(sparsity_level=0.5)),
    ):
        config = {"input_norms": stats.input_norms()["weight"]} if name == "wanda" else {}
        sp.add_data("weight", layer.weight, **config)
        sp.step()
        pruned = held_out @ sp.get_data("weight", return_original=False).detach().T
        errors[name] = float((pruned - dense).norm() / dense.norm())
    assert errors["wanda"] < 0.5 * errors["magnitude"], errors


def test_schedule_drives_the_per_row_level():
    data = torch.randn(8, 20, generator=gen(12))
    sp = WandaSparsifier(sparsity_level=0.5)
    sp.add_data("w", data, input_norms=torch.rand(20, generator=gen(13)))
    sched = LinearScheduler(sp, total_steps=4, initial_value=0.0, target=0.8)
    sp.step()
    seen = [int((~sp.get_mask("w")).sum())]
    for _ in range(4):
        sched.step()
        sp.step()
        seen.append(int((~sp.get_mask("w")).sum()))
    assert seen == [8 * int(level * 20) for level in (0.0, 0.2, 0.4, 0.6, 0.8)]


def test_packed_masks_equal_dense_ones():
    data = torch.randn(40, 64, generator=gen(14))
    norms = torch.rand(64, generator=gen(15))
    for kwargs in ({"sparsity_level": 0.5}, {"n": 2, "m": 4}, {"compare": "tensor"}):
        sp = WandaSparsifier(**kwargs)
        sp.add_data("w", data, input_norms=norms, mask=PackedMask.full(data.shape))
        sp.step()
        assert sp.is_packed("w")
        assert torch.equal(sp.get_mask("w").unpack(), ours(data, norms, **kwargs))


def test_many_row_chunks_and_non_contiguous_data():
    data = torch.randn(256, 8192, generator=gen(16))  # 2M entries: several row chunks
    norms = torch.rand(8192, generator=gen(17))
    assert torch.equal(ours(data, norms), reference_rows(data, norms, 0.5))
    view = torch.randn(64, 128, generator=gen(18)).T  # (128, 64), not contiguous
    norms = torch.rand(64, generator=gen(19))
    for kwargs in ({"sparsity_level": 0.5}, {"n": 2, "m": 4}):
        expected = ours(view.contiguous(), norms, **kwargs)
        assert torch.equal(ours(view, norms, **kwargs), expected)
    expected = ours(view.contiguous(), norms, compare="tensor", scope="global")
    assert torch.equal(ours(view, norms, compare="tensor", scope="global"), expected)


def test_non_finite_weights_and_norms_rank_last():
    data = torch.tensor([[NAN, 1.0, 2.0, 3.0], [INF, -INF, 0.5, 0.25]])
    mask = ours(data, torch.ones(4), sparsity_level=0.5)
    # NaN kept before anything; +/-inf kept before finite scores
    assert torch.equal(mask, torch.tensor([[True, False, False, True], [True, True, False, False]]))
    # a NaN norm (a forward that produced NaN) keeps its column over every finite score
    data = torch.ones(3, 4)
    mask = ours(data, torch.tensor([1.0, NAN, 2.0, 3.0]), sparsity_level=0.5)
    assert bool(mask[:, 1].all()) and not bool(mask[:, 0].any())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    data = torch.randn(16, 32, generator=gen(20)).to(dtype)
    norms = torch.rand(32, generator=gen(21))
    assert torch.equal(ours(data, norms), reference_rows(data.double(), norms.double(), 0.5))


def test_linear_and_embedding_inputs_and_squash():
    layer = nn.Linear(8, 4)
    sp = WandaSparsifier(sparsity_level=0.5)
    sp.add_data("fc.weight", layer.weight, input_norms=torch.ones(8))
    sp.step()
    sp.squash_mask()
    assert int((layer.weight == 0).sum()) == 16


def test_state_dict_and_pickle_round_trips_keep_the_statistics():
    data = torch.randn(6, 8, generator=gen(22))
    norms = torch.rand(8, generator=gen(23))
    sp = WandaSparsifier(sparsity_level=0.5)
    sp.add_data("encoder.layer.0.weight", data, input_norms=norms)
    sp.step()
    buffer = io.BytesIO()
    torch.save(sp.state_dict(), buffer)
    buffer.seek(0)
    loaded = WandaSparsifier()
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    name = "encoder.layer.0.weight"
    assert torch.equal(loaded.get_mask(name), sp.get_mask(name))
    assert torch.equal(loaded.data_groups[name]["input_norms"], norms)
    loaded.get_mask(name).fill_(True)
    loaded.step()  # the restored statistics drive the next step
    assert torch.equal(loaded.get_mask(name), sp.get_mask(name))
    copy = pickle.loads(pickle.dumps(sp))
    copy.step()
    assert torch.equal(copy.get_mask(name), sp.get_mask(name))


def test_a_state_dict_with_bad_statistics_is_refused():
    sp = WandaSparsifier()
    sp.add_data("w", torch.randn(2, 4), input_norms=torch.ones(4))
    state = sp.state_dict()
    state["data_groups"]["w"]["input_norms"] = -torch.ones(4)
    with pytest.raises(ValueError, match=r"input_norms=.*must be >= 0"):
        WandaSparsifier().load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "config", "data", "match"),
    [
        ({}, {}, torch.randn(3, 4), r"data 'x': input_norms=None: WandaSparsifier needs"),
        ({}, {"input_norms": torch.ones(5)}, torch.randn(3, 4), r"one norm per input column: 4"),
        ({}, {"input_norms": -torch.ones(4)}, torch.randn(3, 4), r"must be >= 0"),
        ({}, {"input_norms": torch.ones(2, 2)}, torch.randn(3, 4), r"1-D real tensor"),
        ({}, {"input_norms": torch.ones(4)}, torch.randn(4), r"needs data with rows"),
        ({"n": 2, "m": 4}, {"input_norms": torch.ones(6)}, torch.randn(2, 6), r"m=4: does not"),
        ({}, {"input_norms": torch.ones(4), "sparsity_level": 2}, torch.randn(3, 4), "level"),
    ],
)
def test_bad_data_config_is_refused_naming_the_key(kwargs, config, data, match):
    sp = WandaSparsifier(**kwargs)
    with pytest.raises(ConfigValueError, match=match):
        sp.add_data("x", data, **config)
    assert "x" not in sp.data_groups


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"compare": "column"}, "compare"),
        ({"n": 2}, "m"),
        ({"m": 4}, "n"),
        ({"n": 5, "m": 4}, "n"),
        ({"scope": "global"}, "scope"),
        ({"scope": "global", "compare": "tensor", "n": 2, "m": 4}, "scope"),
        ({"sparsity_level": -0.1}, "sparsity_level"),
    ],
)
def test_bad_arguments_are_config_value_errors(kwargs, key):
    with pytest.raises(ConfigValueError) as error:
        WandaSparsifier(**kwargs)
    assert error.value.key == key


def test_declares_what_calibration_must_provide():
    assert WandaSparsifier.calibration_needs == ("input_norms",)
    assert MagnitudeSparsifier.calibration_needs == ()
