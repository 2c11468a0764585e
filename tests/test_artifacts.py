"""The mask pictures' block-average: exact fractions, partial edge blocks, bounded chunks."""

from __future__ import annotations

import math

import pytest
import torch

from sparsify_exp.runner.artifacts import block_average


def _reference(mask: torch.Tensor, max_side: int) -> torch.Tensor:
    """Plain loops over the blocks, in float64."""
    rows, cols = mask.shape
    fh, fw = math.ceil(rows / max_side), math.ceil(cols / max_side)
    h, w = math.ceil(rows / fh), math.ceil(cols / fw)
    out = torch.empty(h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            block = mask[i * fh : (i + 1) * fh, j * fw : (j + 1) * fw]
            out[i, j] = block.count_nonzero().item() / block.numel()
    return out.float()


def test_exact_fractions_with_partial_edge_blocks():
    # 5 x 7 with max_side 3: fh = 2, fw = 3 -> a 3 x 3 image whose last row band has 1 row
    # and whose last column group has 1 column
    mask = torch.tensor(
        [
            [1, 1, 0, 1, 0, 0, 1],
            [1, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0, 1, 0],
        ],
        dtype=torch.bool,
    )
    expected = torch.tensor(
        [
            [3 / 6, 4 / 6, 1 / 2],
            [1 / 6, 6 / 6, 2 / 2],
            [3 / 3, 1 / 3, 0 / 1],
        ],
        dtype=torch.float32,
    )
    image = block_average(mask, max_side=3)
    assert image.dtype == torch.float32 and image.shape == (3, 3)
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("shape", [(4, 6), (1, 1), (3, 1)])
def test_no_downsampling_is_the_mask_itself(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    image = block_average(mask, max_side=8)
    assert image.shape == mask.shape
    assert torch.equal(image, mask.float())


@pytest.mark.parametrize("chunk_entries", [1, 3, 8, 64, 1 << 20])
@pytest.mark.parametrize(("shape", "max_side"), [((37, 53), 8), ((1, 1000), 7), ((999, 3), 10)])
def test_chunking_does_not_change_the_image(shape, max_side, chunk_entries):
    gen = torch.Generator().manual_seed(shape[0] * shape[1] + max_side)
    mask = torch.rand(shape, generator=gen) > 0.3
    image = block_average(mask, max_side, chunk_entries=chunk_entries)
    assert max(image.shape) <= max_side
    torch.testing.assert_close(image, _reference(mask, max_side), rtol=0, atol=1e-7)


def test_non_contiguous_mask():
    mask = (torch.rand(20, 30, generator=torch.Generator().manual_seed(1)) > 0.5).t()
    torch.testing.assert_close(block_average(mask, 4, chunk_entries=16), _reference(mask, 4))


class _Masks:
    def __init__(self, masks):
        self.masks = masks

    def get_mask(self, name):
        return self.masks[name]


def _grey_share(path, level: float) -> float:
    """The share of the PNG's pixels that are neutral grey at ``level`` (+- 2/255)."""
    from matplotlib.image import imread

    rgb = imread(path)[..., :3]
    neutral = (abs(rgb[..., 0] - rgb[..., 1]) < 0.01) & (abs(rgb[..., 1] - rgb[..., 2]) < 0.01)
    return float((neutral & (abs(rgb[..., 0] - level) < 2 / 255)).mean())


def test_mask_pictures_are_linear_in_the_fraction_kept(tmp_path):
    from sparsify_exp.runner.artifacts import mask_images

    half = torch.ones(64, 64, dtype=torch.bool)
    half[:, 1::2] = False  # 50% kept, a pixel = 1x2 entries -> grey 0.5
    tenth = torch.zeros(64, 60, dtype=torch.bool)
    tenth[:, ::10] = True  # 10% kept, a pixel = 1x2 entries: 0.5 or 0 -> on average 0.1
    n = mask_images(_Masks({"half": half, "tenth": tenth}), ["half", "tenth"], tmp_path, 4, 32)
    assert n == 2
    assert _grey_share(tmp_path / "half.png", 128 / 255) > 0.2  # the plot area, mid grey
    assert _grey_share(tmp_path / "tenth.png", 128 / 255) > 0.01  # kept pairs
    assert _grey_share(tmp_path / "tenth.png", 0.0) > 0.15  # zeroed pairs: black
