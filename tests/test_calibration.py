"""sparsify_exp.calibration: per-feature sums of squares of Linear inputs, lookup counts of
embedding rows (padding, per-sample weights, bag offsets), hooks gone afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsify_exp import CalibrationStats, StatsCollector, collect
from sparsify_exp.calibration import run_batch


class Tower(nn.Module):
    """Token ids -> embedding -> two Linear layers, taking keyword inputs as HF models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6, padding_idx=0)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.embed(input_ids))))


def batches(seed: int = 0, count: int = 4) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 20, (3, 7), generator=gen)} for _ in range(count)]


def test_sums_of_squares_tokens_and_counts_match_a_manual_pass():
    torch.manual_seed(0)
    model = Tower()
    data = batches()
    stats = collect(model, data)
    assert stats.batches == 4
    ids = torch.cat([b["input_ids"].reshape(-1) for b in data])
    with torch.no_grad():
        x1 = model.embed(ids).double()
        x2 = torch.relu(model.fc1(model.embed(ids))).double()
    assert stats.input_tokens == {"fc1.weight": 84, "fc2.weight": 84}
    torch.testing.assert_close(stats.input_sq_sums["fc1.weight"], (x1**2).sum(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.input_sq_sums["fc2.weight"], (x2**2).sum(0), rtol=1e-6, atol=0)
    assert stats.input_sq_sums["fc1.weight"].dtype == torch.float64
    expected = torch.bincount(ids, minlength=20)
    expected[0] = 0  # padding_idx is never counted
    assert torch.equal(stats.row_counts["embed.weight"], expected)
    norms = stats.input_norms()
    torch.testing.assert_close(norms["fc2.weight"], ((x2**2).sum(0) / 84).sqrt(), rtol=1e-6, atol=0)


def test_hooks_are_removed_afterwards_even_on_error():
    model = Tower()
    collect(model, batches(count=1))
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), StatsCollector(model):
        assert model.fc1._forward_pre_hooks
        raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_embedding_bag_offsets_weights_and_include_last_offset():
    bag = nn.EmbeddingBag(10, 4, mode="sum", padding_idx=9)
    ids = torch.tensor([1, 1, 2, 9, 5, 3])
    weights = torch.tensor([1.0, 0.5, 0.0, 1.0, 2.0, 1.0])
    stats = collect(bag, [(ids, torch.tensor([0, 2, 4]), weights)], needs=("row_counts",))
    # the 0-weighted lookup of 2 and the padding row 9 read nothing
    assert stats.row_counts["weight"].tolist() == [0, 2, 0, 1, 0, 1, 0, 0, 0, 0]
    last = nn.EmbeddingBag(10, 4, mode="sum", include_last_offset=True)
    stats = collect(last, [(ids, torch.tensor([0, 2, 4]))], needs=("row_counts",))
    # bags end at the last offset: ids past it are not looked up
    assert stats.row_counts["weight"].tolist() == [0, 2, 1, 0, 0, 0, 0, 0, 0, 1]
    two_d = nn.EmbeddingBag(10, 4, mode="mean")
    stats = collect(two_d, [{"input": torch.tensor([[1, 2], [2, 2]])}], needs=("row_counts",))
    assert stats.row_counts["weight"].tolist() == [0, 1, 3, 0, 0, 0, 0, 0, 0, 0]


def test_needs_and_names_choose_the_modules():
    model = Tower()
    stats = collect(model, batches(count=1), needs=("input_norms",), names=["fc2.weight"])
    assert list(stats.input_sq_sums) == ["fc2.weight"] and not stats.row_counts
    stats = collect(model, batches(count=1), needs=("row_counts",))
    assert list(stats.row_counts) == ["embed.weight"] and not stats.input_sq_sums
    needs = stats.for_needs(("row_counts",))
    assert set(needs) == {"embed.weight"} and set(needs["embed.weight"]) == {"row_counts"}


def test_bad_needs_and_names_are_refused_before_any_hook():
    model = Tower()
    with pytest.raises(ValueError, match=r"'norms' is not one of"):
        StatsCollector(model, needs=("norms",))
    with pytest.raises(ValueError, match=r"names: 'fc1.bias' is not the weight of an nn.Linear"):
        StatsCollector(model, needs=("input_norms",), names=["fc1.bias"])
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_runs_under_inference_mode_and_statistics_stay_usable():
    model = Tower()
    seen = []
    stats = collect(
        model, batches(count=2), on_batch=lambda b: seen.append(torch.is_inference_mode_enabled())
    )
    assert seen == [True, True]
    sums = stats.input_sq_sums["fc1.weight"]
    assert not sums.is_inference()
    sums.add_(1.0)  # in-place use outside inference mode works


def test_streaming_over_many_batches_adds_up():
    model = nn.Linear(5, 2)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(2, 3, 5, generator=gen) for _ in range(50)]
    stats = collect(model, data)
    whole = torch.cat([d.reshape(-1, 5) for d in data]).double()
    torch.testing.assert_close(stats.input_sq_sums["weight"], (whole**2).sum(0), rtol=1e-6, atol=0)
    assert stats.input_tokens["weight"] == 300 and stats.batches == 50


def test_run_batch_calls_by_batch_type():
    model = nn.Bilinear(2, 3, 1)
    a, b = torch.ones(1, 2), torch.ones(1, 3)
    assert run_batch(model, (a, b)).shape == (1, 1)
    assert run_batch(model, {"input1": a, "input2": b}).shape == (1, 1)
    assert run_batch(nn.Linear(2, 1), a).shape == (1, 1)


def test_stats_default_empty():
    stats = CalibrationStats()
    assert stats.input_norms() == {} and stats.for_needs(("input_norms", "row_counts")) == {}
