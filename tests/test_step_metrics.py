"""Churn between steps from packed masks: the same counts as comparing dense copies."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsify_exp.runner.step_metrics import MaskChurn, _popcount


def test_popcount_of_every_byte():
    every = torch.arange(256, dtype=torch.uint8)
    assert int(_popcount(every)) == sum(bin(b).count("1") for b in range(256))
    assert int(_popcount(torch.tensor([255] * 1000, dtype=torch.uint8))) == 8000


@pytest.mark.parametrize("chunk_entries", [8, 16, 1 << 23])
@pytest.mark.parametrize("shape", [(13,), (7, 9), (64, 8), (3, 5, 2)])
def test_counts_flips_like_a_dense_comparison(shape, chunk_entries):
    gen = torch.Generator().manual_seed(sum(shape))
    masks = [torch.rand(shape, generator=gen) > 0.5 for _ in range(4)]
    churn = MaskChurn(chunk_entries)
    assert churn.update("a", masks[0]) == 0  # nothing to compare with yet
    for before, after in itertools.pairwise(masks):
        assert churn.update("a", after) == int((before != after).count_nonzero())


def test_names_are_independent_and_any_dtype_counts_nonzero_as_kept():
    churn = MaskChurn()
    churn.update("a", torch.zeros(10, dtype=torch.bool))
    churn.update("b", torch.ones(4, 4))
    assert churn.update("a", torch.tensor([1, 0] * 5)) == 5
    assert churn.update("b", torch.eye(4)) == 12
    churn.clear()
    assert churn.update("a", torch.ones(10)) == 0


def test_chunk_must_start_on_a_byte():
    with pytest.raises(ValueError, match="multiple of 8"):
        MaskChurn(12)
