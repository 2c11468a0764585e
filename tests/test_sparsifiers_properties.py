"""The invariants of tests/test_properties.py for the magnitude, N:M, row and random
sparsifiers, on the same data: random shapes (empty, scalar, 1 x 1), non-contiguous views,
fp16/bf16/fp32/fp64 and complex, ties, NaN and inf.

    HYPOTHESIS_PROFILE=thorough pytest tests/test_sparsifiers_properties.py

Each mask is compared with its definition written the slow way (a stable sort of ``|x|``,
NaN last), then run through add, step, step, state_dict, squash.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_properties import (
    COMPLEX_DTYPES,
    REAL_DTYPES,
    _assert_lower_never_kept,
    _examples,
    _magnitude,
    check_invariants,
    datas,
)

from sparsify_exp import MagnitudeSparsifier, NMSparsifier, RandomSparsifier, RowSparsifier

LEVELS = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0, allow_nan=False))


def _magnitudes(data: torch.Tensor) -> torch.Tensor:
    """float64 |x|, flat (complex: C99's cabs, inf beside NaN)."""
    return _magnitude(data, "L1").reshape(-1)


def _lowest(values: torch.Tensor, k: int) -> torch.Tensor:
    """``bool``: the first ``k`` of a stable sort (NaN last, ties by position)."""
    chosen = torch.zeros(values.numel(), dtype=torch.bool)
    chosen[torch.argsort(values, stable=True)[:k]] = True
    return chosen


def check_magnitude_mask(data: torch.Tensor, mask: torch.Tensor, level: float) -> None:
    k = round(level * data.numel())
    assert int((~mask).sum()) == k
    assert torch.equal(~mask.reshape(-1), _lowest(_magnitudes(data), k))


@_examples(1.5)
@given(case=datas(REAL_DTYPES + COMPLEX_DTYPES), level=LEVELS)
def test_magnitude_invariants(case, level):
    view, base = case
    check_invariants(
        MagnitudeSparsifier,
        view,
        base,
        lambda data, mask: check_magnitude_mask(data, mask, level),
        sparsity_level=level,
    )


@_examples(1.0)
@given(first=datas(REAL_DTYPES + COMPLEX_DTYPES), second=datas(REAL_DTYPES), level=LEVELS)
def test_global_magnitude_is_one_sort_over_all_names(first, second, level):
    views = {"a.weight": first[0], "b": second[0]}
    originals = {name: view.clone() for name, view in views.items()}
    sp = MagnitudeSparsifier(sparsity_level=level, scope="global")
    for name, view in views.items():
        sp.add_data(name, view)
    sp.step()
    values = torch.cat([_magnitudes(v) for v in originals.values()])
    k = round(level * values.numel())
    removed = torch.cat([~sp.get_mask(name).reshape(-1) for name in views])
    assert torch.equal(removed, _lowest(values, k))
    for name, view in views.items():  # the data is untouched
        assert torch.equal(view.isnan(), originals[name].isnan())


@st.composite
def nm_cases(draw):
    view, base = draw(datas(REAL_DTYPES + COMPLEX_DTYPES))
    last = view.shape[-1] if view.dim() else 1
    divisors = [d for d in range(1, 33) if last == 0 or last % d == 0]
    m = draw(st.sampled_from(divisors))
    n = draw(st.integers(0, m))
    return view, base, n, m


def check_nm_mask(data: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> None:
    groups = _magnitudes(data).view(-1, m)
    removed = ~mask.reshape(-1, m)
    assert torch.equal(removed.sum(1), torch.full((groups.shape[0],), m - n))
    expected = torch.zeros(groups.shape, dtype=torch.bool)
    expected.scatter_(1, torch.argsort(groups, dim=1, stable=True)[:, : m - n], True)
    assert torch.equal(removed, expected)


@_examples(1.5)
@given(case=nm_cases())
def test_nm_invariants(case):
    view, base, n, m = case
    check_invariants(
        NMSparsifier, view, base, lambda data, mask: check_nm_mask(data, mask, n, m), n=n, m=m
    )


def check_row_mask(data: torch.Tensor, mask: torch.Tensor, level: float, norm: str) -> None:
    """Whole rows, exactly round(level * rows), none scoring above a kept one."""
    if data.numel() == 0:
        assert mask.all()
        return
    rows = data.shape[0] if data.dim() else 1
    mask2d = mask.reshape(rows, -1)
    kept = mask2d[:, 0]
    assert torch.equal(mask2d, kept[:, None].expand_as(mask2d))
    assert int((~kept).sum()) == round(level * rows)
    scores = _magnitude(data, norm).reshape(rows, -1).sum(1)
    _assert_lower_never_kept(scores, ~kept, kept)


@_examples(1.0)
@given(case=datas(REAL_DTYPES + COMPLEX_DTYPES), level=LEVELS, norm=st.sampled_from(["L1", "L2"]))
def test_row_invariants(case, level, norm):
    view, base = case
    check_invariants(
        RowSparsifier,
        view,
        base,
        lambda data, mask: check_row_mask(data, mask, level, norm),
        sparsity_level=level,
        norm=norm,
    )


@_examples(1.0)
@given(case=datas(REAL_DTYPES), level=LEVELS, seed=st.integers(0, 2**64 - 1))
def test_random_invariants(case, level, seed):
    view, base = case

    def check(data: torch.Tensor, mask: torch.Tensor) -> None:
        assert int((~mask).sum()) == round(level * data.numel())
        again = RandomSparsifier(sparsity_level=level, seed=seed)
        again.add_data("d", torch.zeros(data.shape))  # values and layout play no part
        again.step()
        assert torch.equal(again.get_mask("d"), mask)

    check_invariants(RandomSparsifier, view, base, check, sparsity_level=level, seed=seed)


@pytest.mark.parametrize("shape", [(0,), (0, 4), (1, 1), ()])
def test_edge_shapes_run_through_every_new_sparsifier(shape):
    data = torch.ones(shape)
    check_invariants(
        MagnitudeSparsifier,
        data,
        data,
        lambda d, m: check_magnitude_mask(d, m, 1.0),
        sparsity_level=1.0,
    )
    check_invariants(NMSparsifier, data, data, lambda d, m: check_nm_mask(d, m, 0, 1), n=0, m=1)
    check_invariants(
        RowSparsifier,
        data,
        data,
        lambda d, m: check_row_mask(d, m, 1.0, "L1"),
        sparsity_level=1.0,
    )
