"""The library on CUDA tensors: every sparsifier, in fp32, fp16 and bf16, gives the CPU's mask
for the same values, keeps its mask on the data's GPU at one byte an entry, squashes in
place, round-trips its state, and the streamed writer writes from GPU memory the bytes
``save_file`` writes for the CPU squash. Skipped without a GPU; ``scripts/gpu_check.sh`` runs
them (with the 2:4 ``to_sparse_semi_structured`` and nccl checks marked ``cuda`` elsewhere)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sparsify_exp import (
    BaseDataSparsifier,
    DataNormSparsifier,
    FirstRowSparsifier,
    MagnitudeSparsifier,
    NMSparsifier,
    RandomSparsifier,
    RowSparsifier,
)
from sparsify_exp.streaming import write_squashed

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

SPARSIFIERS: dict[str, Callable[[], BaseDataSparsifier]] = {
    "data_norm_1x4": lambda: DataNormSparsifier(sparsity_level=0.7, sparse_block_shape=(1, 4)),
    "data_norm_global": lambda: DataNormSparsifier(
        sparsity_level=0.6, sparse_block_shape=(1, 1), scope="global"
    ),
    "magnitude": lambda: MagnitudeSparsifier(sparsity_level=0.5),
    "magnitude_global": lambda: MagnitudeSparsifier(sparsity_level=0.8, scope="global"),
    "nm_2_4": lambda: NMSparsifier(n=2, m=4),
    "row": lambda: RowSparsifier(sparsity_level=0.5),
    "random": lambda: RandomSparsifier(sparsity_level=0.5, seed=3),
    "first_row": FirstRowSparsifier,
}


def _tables(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Distinct values (no ties), so a mask is a function of the values alone."""
    gen = torch.Generator().manual_seed(0)
    return {
        "emb.user": (torch.randperm(96 * 32, generator=gen).view(96, 32) - 1500).to(dtype) / 64,
        "lin.weight": (torch.randperm(40 * 16, generator=gen).view(40, 16) + 1).to(dtype) / 64,
    }


def _stepped(make: Callable[[], BaseDataSparsifier], tables: dict[str, torch.Tensor], device):
    sp = make()
    data = {n: t.clone().to(device) for n, t in tables.items()}
    for name, tensor in data.items():
        sp.add_data(name, tensor)
    sp.step()
    return sp, data


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", SPARSIFIERS)
def test_cuda_masks_equal_the_cpu_masks(kind, dtype, device="cuda"):
    tables = _tables(dtype)
    gpu, data = _stepped(SPARSIFIERS[kind], tables, device)
    cpu, _ = _stepped(SPARSIFIERS[kind], tables, "cpu")
    for name in tables:
        mask = gpu.get_mask(name)
        assert mask.device.type == torch.device(device).type
        assert mask.dtype == torch.bool and mask.shape == tables[name].shape
        assert torch.equal(mask.cpu(), cpu.get_mask(name)), name
    gpu.squash_mask()
    for name, tensor in data.items():
        assert tensor.dtype == dtype  # squashed in place, in the data's own dtype
        assert torch.equal(tensor.cpu(), tables[name] * cpu.get_mask(name)), name


@pytest.mark.parametrize("kind", ["data_norm_1x4", "magnitude", "nm_2_4", "row"])
def test_cuda_state_dict_round_trips_onto_the_gpu(kind, device="cuda"):
    tables = _tables(torch.bfloat16)
    sp, _ = _stepped(SPARSIFIERS[kind], tables, device)
    state = sp.state_dict()
    loaded = SPARSIFIERS[kind]()
    loaded.load_state_dict(state)
    for name in tables:
        assert loaded.get_mask(name).device.type == torch.device(device).type
        assert torch.equal(loaded.get_mask(name), sp.get_mask(name)), name


def test_cuda_embedding_modules_keep_their_weights_on_the_gpu(device="cuda"):
    torch.manual_seed(1)
    emb = nn.Embedding(300, 16).to(device).half()
    bag = nn.EmbeddingBag(200, 8, mode="sum").to(device)
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sp.add_data("emb", emb)
    sp.add_data("bag", bag)
    sp.step()
    sp.squash_mask()
    assert emb.weight.device.type == bag.weight.device.type == torch.device(device).type
    kept = float((emb.weight != 0).float().mean())
    assert 0.45 <= kept <= 0.55
    out = bag(torch.tensor([1, 2, 3, 4], device=device), torch.tensor([0, 2], device=device))
    assert out.shape == (2, 8) and out.device.type == torch.device(device).type


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_streamed_write_from_gpu_memory_is_the_cpu_squash(tmp_path, dtype, device="cuda"):
    tables = _tables(dtype)
    sp, data = _stepped(SPARSIFIERS["magnitude"], tables, device)
    written = write_squashed(data, sp, tmp_path / "from_gpu.safetensors")
    cpu, squashed = _stepped(SPARSIFIERS["magnitude"], tables, "cpu")
    cpu.squash_mask()
    save_file(squashed, tmp_path / "cpu.safetensors")
    assert written.path.read_bytes() == (tmp_path / "cpu.safetensors").read_bytes()
    for name, tensor in data.items():
        assert tensor.device.type == torch.device(device).type  # the source stays on the GPU
        assert torch.equal(tensor.cpu(), tables[name])  # and unchanged
