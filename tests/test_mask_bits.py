"""pack_mask / unpack_mask: 1 bit an entry, exact round trip, weights_only-loadable."""

from __future__ import annotations

import io

import pytest
import torch

from sparsify_exp import pack_mask, unpack_mask
from sparsify_exp.sparsifier.mask_bits import packed_nbytes


@pytest.mark.parametrize(
    "shape", [(0,), (1,), (7,), (8,), (9,), (3, 5), (16, 8), (2, 3, 4, 5), (1000, 13), ()]
)
def test_round_trip_exact_for_any_shape(shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    mask = torch.rand(shape, generator=gen) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == (mask.numel() + 7) // 8 == packed_nbytes(mask.numel())
    out = unpack_mask(packed, shape)
    assert out.shape == mask.shape
    assert torch.equal(out.bool(), mask)
    assert out.element_size() == 1


def test_unpack_returns_bool():
    assert unpack_mask(pack_mask(torch.ones(10, dtype=torch.bool)), (10,)).dtype == torch.bool


def test_bit_order_is_lsb_first():
    mask = torch.zeros(16, dtype=torch.bool)
    mask[0] = True  # byte 0, bit 0
    mask[3] = True  # byte 0, bit 3
    mask[15] = True  # byte 1, bit 7
    assert pack_mask(mask).tolist() == [1 + 8, 128]
    assert pack_mask(torch.ones(10, dtype=torch.bool)).tolist() == [255, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.uint8, torch.float16])
def test_non_bool_masks_pack_nonzero_as_kept(dtype):
    mask = torch.tensor([0, 1, 2, 0, -1, 0.5, 0, 0, 3], dtype=torch.float32).to(dtype)
    expected = mask != 0
    assert torch.equal(unpack_mask(pack_mask(mask), (9,)).bool(), expected)


def test_non_contiguous_mask():
    mask = torch.rand(12, 10) > 0.3
    view = mask.t()
    assert not view.is_contiguous()
    assert torch.equal(unpack_mask(pack_mask(view), view.shape).bool(), view)


def test_packed_is_an_eighth_and_loads_weights_only():
    mask = torch.rand(4096, 64) > 0.5
    packed = pack_mask(mask)
    assert packed.untyped_storage().nbytes() == 4096 * 64 // 8
    buffer = io.BytesIO()
    torch.save({"mask": packed, "shape": tuple(mask.shape)}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert torch.equal(unpack_mask(loaded["mask"], loaded["shape"]).bool(), mask)


def test_unpack_to_device():
    packed = pack_mask(torch.ones(5, dtype=torch.bool))
    assert unpack_mask(packed, (5,), device="meta").device.type == "meta"
    assert unpack_mask(packed, (5,), device="cpu").device.type == "cpu"


@pytest.mark.parametrize(
    ("packed", "shape"),
    [
        (torch.zeros(2, dtype=torch.uint8), (3, 8)),  # too short
        (torch.zeros(4, dtype=torch.uint8), (3, 8)),  # too long
        (torch.zeros(3, dtype=torch.int32), (3, 8)),  # wrong dtype
        (torch.zeros(3, 1, dtype=torch.uint8), (3, 8)),  # not 1-D
    ],
)
def test_unpack_rejects_wrong_input(packed, shape):
    with pytest.raises(ValueError):
        unpack_mask(packed, shape)


@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (3, 5), (64, 33), (2, 3, 4)])
def test_torch_fallback_packs_the_same_bytes_as_numpy(shape, monkeypatch):
    # the fallback is what runs on CUDA tensors or without numpy
    import sparsify_exp.sparsifier.mask_bits as mask_bits

    torch.manual_seed(1)
    mask = torch.rand(shape) > 0.5
    with_numpy = pack_mask(mask)
    monkeypatch.setattr(mask_bits, "_numpy", lambda: None)
    fallback = pack_mask(mask)
    assert torch.equal(fallback, with_numpy)
    assert torch.equal(unpack_mask(fallback, shape), mask)
