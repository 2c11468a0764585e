"""Invariants every sparsifier keeps on any data: random shapes (empty, scalar, 1 x 1),
non-contiguous views, fp16/bf16/fp32/fp64 (and complex for data norm), ties, NaN and inf.

    HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py   # many more examples

The invariants: exactly the promised count removed; the mask has the data's shape; a step on
unchanged data changes nothing; ``squash_mask`` writes what the masked view showed (and only
into the view); a ``state_dict`` round trip gives the same masks.
"""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsify_exp import DataNormSparsifier, FirstRowSparsifier
from sparsify_exp.sparsifier import block_ops, count_nonfinite

_COMMON = dict(
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    print_blob=True,  # a failure prints the @reproduce_failure line to replay it
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("default", max_examples=60, **_COMMON)
settings.register_profile("thorough", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _examples(scale: float) -> settings:
    """The loaded profile's example count, scaled for one test."""
    return settings(max_examples=max(1, round(settings.default.max_examples * scale)))


NAN, INF = float("nan"), float("inf")
REAL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
COMPLEX_DTYPES = [torch.complex64, torch.complex128]
# exact in every dtype, and so are their squares and the sums of a block of them in fp32:
# equal blocks really are equal (ties), and no rounding can reorder distinct ones
PALETTE = torch.tensor([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0, 7.0, 100.0])

# ------------------------------------------------------------------------------- data


@st.composite
def shapes(draw) -> tuple[int, ...]:
    # the edge cases, and one shape above block_ops.SMALL_ELEMENTS (the chunked path)
    special = [(), (0,), (1, 1), (0, 5), (5, 0), (1,), (0, 3, 2), (1, 7, 1), (300, 230)]
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(special))
    dims = draw(st.integers(1, 3))
    high = (64, 12, 6)[dims - 1]
    return tuple(draw(st.lists(st.integers(0, high), min_size=dims, max_size=dims)))


def _fill(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    values: str,
    nan_p: float,
    inf_p: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """float64 values of ``shape`` (complex: two parts), then cast to ``dtype``."""
    parts = 2 if dtype.is_complex else 1
    if values == "ties":
        index = torch.randint(0, PALETTE.numel(), (parts, *shape), generator=gen)
        real = PALETTE.double()[index]
    else:
        real = torch.randn((parts, *shape), generator=gen, dtype=torch.float64)
    if nan_p:
        real[torch.rand(real.shape, generator=gen) < nan_p] = NAN
    if inf_p:
        sign = torch.randint(0, 2, real.shape, generator=gen).double() * 2 - 1
        where = torch.rand(real.shape, generator=gen) < inf_p
        real[where] = sign[where] * INF
    data = torch.complex(real[0], real[1]) if parts == 2 else real[0]
    return data.to(dtype)


@st.composite
def datas(draw, dtypes: list[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(view, base)``: the data to sparsify, often a non-contiguous view of ``base``."""
    shape = draw(shapes())
    dtype = draw(st.sampled_from(dtypes))
    values = draw(st.sampled_from(["ties", "random"]))
    nan_p = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0]))
    inf_p = draw(st.sampled_from([0.0, 0.0, 0.1, 0.4]))
    layouts = ["contiguous", "offset"] + (["strided"] if shape else [])
    layouts += ["transposed"] if len(shape) >= 2 else []
    layout = draw(st.sampled_from(layouts))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if layout == "transposed":  # a permutation of a contiguous base: strides reversed
        base = _fill(shape[::-1], dtype, values, nan_p, inf_p, gen)
        view = base.permute(*reversed(range(len(shape))))
    elif layout == "strided":  # every other entry of the last dim
        base = _fill((*shape[:-1], 2 * shape[-1] + 1), dtype, values, nan_p, inf_p, gen)
        view = base[..., 1::2]
    elif layout == "offset":  # contiguous, but not at the start of its storage
        base = _fill(
            (shape[0] + 1, *shape[1:]) if shape else (2,), dtype, values, nan_p, inf_p, gen
        )
        view = base[1:] if shape else base[1]
    else:
        base = _fill(shape, dtype, values, nan_p, inf_p, gen)
        view = base
    assert view.shape == shape
    return view, base


@st.composite
def data_norm_configs(draw) -> dict:
    block = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    level = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0, allow_nan=False)))
    zeros = draw(st.one_of(st.none(), st.integers(0, block[0] * block[1])))
    norm = draw(st.sampled_from(["L1", "L2"]))
    return dict(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm)


# ------------------------------------------------------------------------------ oracles


def _as_2d(tensor: torch.Tensor) -> torch.Tensor:
    """The documented 2-D view: size-1 dims dropped, 1-D as a row, N-D as (shape[0], -1)."""
    squeezed = tensor.squeeze()
    if squeezed.dim() == 0:
        return squeezed.reshape(1, 1)
    if squeezed.dim() == 1:
        return squeezed.reshape(1, -1)
    return squeezed.reshape(squeezed.shape[0], -1)


def _magnitude(tensor: torch.Tensor, norm: str) -> torch.Tensor:
    """|x| or |x|**2 in float64; complex |x| as C99's cabs: inf if a part is, even beside
    a NaN part."""
    if tensor.is_complex():
        re, im = torch.view_as_real(tensor.to(torch.complex128)).unbind(-1)
        magnitude = torch.where(re.isinf() | im.isinf(), INF, torch.hypot(re, im))
    else:
        magnitude = tensor.double().abs()
    return magnitude if norm == "L1" else magnitude.square()


def _tiles(t2d: torch.Tensor, block: tuple[int, int], fill: float) -> torch.Tensor:
    """(rows, cols, bh * bw): each block's entries, padded with ``fill``."""
    height, width = t2d.shape
    bh, bw = block
    rows, cols = math.ceil(height / bh), math.ceil(width / bw)
    padded = t2d.new_full((rows * bh, cols * bw), fill)
    padded[:height, :width] = t2d
    return padded.view(rows, bh, cols, bw).permute(0, 2, 1, 3).reshape(rows, cols, bh * bw)


def _assert_lower_never_kept(
    values: torch.Tensor, removed: torch.Tensor, kept: torch.Tensor
) -> None:
    """Along the last dim, no ``removed`` value ranks above a ``kept`` one (NaN above all,
    +inf included); slack for the fp32 rounding of the sparsifier's own arithmetic."""
    nan = values.isnan()
    number = torch.where(nan, 0.0, values)
    removed_nan = (removed & nan).any(-1)
    kept_number = (kept & ~nan).any(-1)
    assert not (removed_nan & kept_number).any(), "a NaN was removed while a number was kept"
    removed_max = torch.where(removed & ~nan, number, -INF).amax(-1)
    kept_min = torch.where(kept & ~nan, number, INF).amin(-1)
    assert (removed_max <= kept_min * (1 + 1e-5)).all(), "a larger value was removed"


def check_data_norm_mask(data: torch.Tensor, mask: torch.Tensor, config: dict) -> None:
    """Exactly round(level * blocks) blocks touched, each losing min(zeros, its entries),
    the lowest-scoring ones, and the lowest entries inside them."""
    assert mask.shape == data.shape and mask.dtype == torch.bool
    if data.numel() == 0:
        assert mask.all()
        return
    block, norm = config["sparse_block_shape"], config["norm"]
    per_block = block[0] * block[1]
    zeros = per_block if config["zeros_per_block"] is None else config["zeros_per_block"]
    magnitude = _as_2d(_magnitude(data, norm))
    tiles = _tiles(magnitude, block, 0.0)
    zeroed = _tiles(_as_2d(~mask).double(), block, 0.0) > 0  # padding is never zeroed
    valid = _tiles(torch.ones_like(magnitude), block, 0.0) > 0
    entries = valid.sum(-1)
    lost = zeroed.sum(-1)
    removed = lost > 0
    expected = 0 if zeros == 0 else round(config["sparsity_level"] * removed.numel())
    assert int(removed.sum()) == expected
    assert torch.equal(lost[removed], entries[removed].clamp(max=zeros))
    # the blocks: mean over the valid entries (NaN if one is NaN); the lowest are removed
    scores = (tiles.sum(-1) / entries).flatten()
    _assert_lower_never_kept(scores, removed.flatten(), ~removed.flatten())
    # inside each removed block, the zeroed entries are the smallest
    inside = removed[..., None]
    _assert_lower_never_kept(tiles, zeroed & valid & inside, ~zeroed & valid & inside)


def check_first_row_mask(data: torch.Tensor, mask: torch.Tensor) -> None:
    """Row 0 removed (entry 0 of 1-D data; nothing of a scalar), nothing else."""
    expected = torch.ones(data.shape, dtype=torch.bool)
    if data.dim() > 0 and data.shape[0] > 0:
        expected[0] = False
    assert torch.equal(mask, expected)


# ---------------------------------------------------------------------- the invariants


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN, dtypes and shapes equal."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        both_nan = a.isnan() & b.isnan()
        return bool(((a == b) | both_nan).all())
    return torch.equal(a, b)


def _round_trip(sp, cls, **kwargs):
    buffer = io.BytesIO()
    torch.save(sp.state_dict(), buffer)
    buffer.seek(0)
    fresh = cls(**kwargs)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def check_invariants(cls, view: torch.Tensor, base: torch.Tensor, check_mask, **kwargs):
    """Runs one sparsifier through add, step, step, state_dict, squash on ``view``."""
    original_base = base.clone()
    original = view.clone()
    sp = cls(**kwargs)
    sp.add_data("d", view)
    sp.step()
    mask = sp.get_mask("d").clone()
    assert mask.shape == view.shape and mask.dtype == torch.bool
    check_mask(original, mask)
    assert _same(view, original), "a step changed the data"

    sp.step()  # unchanged data: the same mask
    assert torch.equal(sp.get_mask("d"), mask)

    masked = sp.get_data("d", return_original=False).detach().clone()
    assert _same(masked, torch.where(mask, original, torch.zeros((), dtype=original.dtype)))

    loaded = _round_trip(sp, cls, **kwargs)
    assert torch.equal(loaded.get_mask("d"), mask)
    assert loaded.get_mask("d").dtype == torch.bool
    loaded.step()
    assert torch.equal(loaded.get_mask("d"), mask)

    sp.squash_mask()
    assert _same(view, masked), "squash_mask wrote something else than the masked view"
    outside = _outside_of(view, base)
    assert _same(base[outside], original_base[outside]), "squash wrote outside the view"
    assert torch.equal(sp.get_mask("d"), mask)
    squashed = _round_trip(sp, cls, **kwargs)
    assert torch.equal(squashed.get_mask("d"), mask) and squashed.is_squashed("d")


def _outside_of(view: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``bool`` of ``base``'s shape: True where ``view`` (a view of contiguous ``base``)
    does not reach."""
    assert base.is_contiguous() and view.untyped_storage().data_ptr() == base.data_ptr()
    outside = torch.ones(base.shape, dtype=torch.bool)
    offset = view.storage_offset() - base.storage_offset()
    outside.as_strided(view.shape, view.stride(), offset).fill_(False)
    return outside


@_examples(2.5)
@given(case=datas(REAL_DTYPES + COMPLEX_DTYPES), config=data_norm_configs())
def test_data_norm_invariants(case, config):
    view, base = case
    norm = config.pop("norm")
    config_all = {**config, "norm": norm}
    check_invariants(
        DataNormSparsifier,
        view,
        base,
        lambda data, mask: check_data_norm_mask(data, mask, config_all),
        norm=norm,
        **config,
    )


@_examples(1.0)
@given(case=datas(REAL_DTYPES))
def test_first_row_invariants(case):
    view, base = case
    check_invariants(FirstRowSparsifier, view, base, check_first_row_mask)


@_examples(1.0)
@given(
    values=st.lists(
        st.sampled_from([0.0, 1.0, 2.0, 2.5, 3.0, INF, NAN, -1.0]), min_size=1, max_size=400
    ),
    fraction=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_smallest_k_is_a_stable_sort_with_nan_last(values, fraction, dtype):
    """The selection under every data norm mask: exactly k, NaN last, ties by position."""
    scores = torch.tensor(values, dtype=dtype)
    k = round(fraction * scores.numel())
    expected = torch.zeros(scores.numel(), dtype=torch.bool)
    expected[torch.argsort(scores, stable=True)[:k]] = True
    assert torch.equal(block_ops.smallest_k(scores, k), expected)
    grid = scores.view(1, -1)
    assert torch.equal(block_ops.smallest_k(grid, k), expected.view(1, -1))


@_examples(0.5)
@given(case=datas(REAL_DTYPES + COMPLEX_DTYPES), chunk=st.integers(1, 300))
def test_count_nonfinite_matches_isfinite(case, chunk):
    view, _ = case
    assert count_nonfinite(view, chunk_elements=chunk) == int((~torch.isfinite(view)).sum())


def test_profiles_are_registered():
    assert (
        settings.get_profile("thorough").max_examples
        > 10 * settings.get_profile("default").max_examples
    )
    assert settings.get_profile("default").deadline is None


@pytest.mark.parametrize("shape", [(0,), (0, 4), (1, 1), ()])
def test_edge_shapes_run_through_both_sparsifiers(shape):
    """The shapes the strategies must keep reaching, run once whatever hypothesis draws."""
    data = torch.ones(shape)
    check_invariants(FirstRowSparsifier, data, data, check_first_row_mask)
    config = dict(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=None)
    data = torch.ones(shape)
    check_invariants(
        DataNormSparsifier,
        data,
        data,
        lambda d, m: check_data_norm_mask(d, m, {**config, "norm": "L1"}),
        **config,
    )
