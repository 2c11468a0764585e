"""Memory-mapped data: packed masks equal the in-memory ones, and the streamed squash equals
``save_file`` of the in-memory squash, byte for byte."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparsify_exp import (
    DataNormSparsifier,
    FirstRowSparsifier,
    MagnitudeSparsifier,
    NMSparsifier,
    RandomSparsifier,
    RowSparsifier,
)
from sparsify_exp.sparsifier.packed_mask import PackedMask
from sparsify_exp.sparsifier.packed_select import (
    SAMPLE,
    BlockScoreKeys,
    EntryKeys,
    select_packed,
)
from sparsify_exp.sparsifier.select import select_and_write
from sparsify_exp.streaming import (
    FileChangedError,
    NotEnoughSpaceError,
    add_mapped,
    open_checkpoint,
    should_map,
    write_squashed,
)


def _data() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    nan = torch.randn(513, 132)
    nan[::7, 3] = float("nan")
    nan[5] = float("inf")
    return {
        "wide": torch.randn(3001, 68),
        "small": torch.randn(37, 20),
        "ties": torch.randint(-3, 4, (2000, 64)).float(),
        "vector": torch.randn(1000),
        "nan": nan,
        "fp64": torch.randn(700, 300, dtype=torch.float64),
        "fp16": torch.randn(300, 64).half(),
        "conv": torch.randn(16, 8, 3, 3),
    }


SPARSIFIERS = {
    "data_norm_1x4": lambda: DataNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 4)),
    "data_norm_3x5": lambda: DataNormSparsifier(sparsity_level=0.3, sparse_block_shape=(3, 5)),
    "data_norm_zeros": lambda: DataNormSparsifier(
        sparsity_level=0.6, sparse_block_shape=(2, 4), zeros_per_block=3, norm="L2"
    ),
    "data_norm_global": lambda: DataNormSparsifier(sparsity_level=0.5, scope="global"),
    "magnitude": lambda: MagnitudeSparsifier(sparsity_level=0.8),
    "magnitude_global": lambda: MagnitudeSparsifier(sparsity_level=0.7, scope="global"),
    "nm": lambda: NMSparsifier(n=2, m=4),
    "row": lambda: RowSparsifier(sparsity_level=0.4),
    "random": lambda: RandomSparsifier(sparsity_level=0.7, seed=3),
    "first_row": FirstRowSparsifier,
}


@pytest.mark.parametrize("kind", list(SPARSIFIERS))
def test_a_packed_step_gives_the_in_memory_masks(kind):
    data = _data()
    if kind == "nm":
        data = {n: t for n, t in data.items() if t.shape[-1] % 4 == 0}
    dense, packed = SPARSIFIERS[kind](), SPARSIFIERS[kind]()
    for name, tensor in data.items():
        dense.add_data(name, tensor)
        packed.add_data(name, tensor, mask=PackedMask.full(tensor.shape))
    before = {n: t.clone() for n, t in data.items()}
    dense.step()
    packed.step()
    for name, tensor in data.items():
        mask = packed.get_mask(name)
        assert isinstance(mask, PackedMask) and packed.is_packed(name)
        assert torch.equal(mask.unpack(), dense.get_mask(name)), name
        assert int(mask.count_nonzero()) == int(dense.get_mask(name).count_nonzero())
        # never written to (NaN included)
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kind", ["magnitude", "data_norm"])
def test_a_table_larger_than_the_sample_is_bracketed_by_stripes(kind):
    torch.manual_seed(1)
    # rows of very different scales, sorted, as tables ordered by lookups are
    table = torch.rand(2200, 512).sub_(0.5) / torch.arange(1, 2201).float()[:, None]
    assert table.numel() > SAMPLE
    block = (1, 1)
    make = {
        "magnitude": lambda: MagnitudeSparsifier(sparsity_level=0.75),
        "data_norm": lambda: DataNormSparsifier(sparsity_level=0.75, sparse_block_shape=block),
    }[kind]
    dense, packed = make(), make()
    dense.add_data("t", table)
    add_mapped(packed, "t", table)
    dense.step()
    packed.step()
    assert torch.equal(packed.get_mask("t").unpack(), dense.get_mask("t"))


@pytest.mark.parametrize(
    "bracket", ["below", "above", "wide"], ids=["threshold-below", "threshold-above", "overflow"]
)
def test_a_bracket_that_misses_falls_back_to_the_exact_selection(bracket):
    torch.manual_seed(2)
    data = torch.randn(3000, 700)
    source = EntryKeys(data, torch.int32)
    k = round(0.6 * data.numel())
    expected = torch.empty(data.numel(), dtype=torch.bool)
    select_and_write(source, k, expected)
    top = torch.iinfo(torch.int32).max
    keys = torch.sort(source.keys_at(torch.arange(0, data.numel(), 997))).values
    brackets = {
        "below": (int(keys[10]), int(keys[20])),
        "above": (int(keys[-20]), int(keys[-10])),
        "wide": (0, top - 1),  # every key a candidate: more than the cap
    }
    out = PackedMask.full((data.numel(),))
    select_packed(source, k, out, brackets[bracket])
    assert torch.equal(out.unpack(), expected)


def test_block_score_keys_rank_as_the_in_memory_scores():
    torch.manual_seed(3)
    data = torch.randn(1031, 203)
    source = BlockScoreKeys(data, (3, 4), "L1")
    whole = torch.cat([keys.clone() for _, keys in source.chunks()])
    assert whole.numel() == source.numel == 344 * 51
    assert torch.equal(source.keys_range(100, 5000), whole[100:5000])


def test_packed_mask_reads_and_writes_any_range():
    torch.manual_seed(4)
    dense = torch.rand(37, 11) > 0.5
    packed = PackedMask.from_mask(dense)
    assert torch.equal(packed.unpack(), dense) and packed.bits.numel() == (37 * 11 + 7) // 8
    assert torch.equal(packed[3:9], dense[3:9]) and torch.equal(packed[-1], dense[-1])
    assert torch.equal(packed.reshape(-1)[5:200], dense.reshape(-1)[5:200])
    flat = dense.reshape(-1).clone()
    patch = torch.rand(101) > 0.3
    packed.write(13, patch)  # neither end on a byte boundary
    flat[13:114] = patch
    assert torch.equal(packed.unpack().reshape(-1), flat)
    positions = torch.tensor([0, 1, 9, 406])
    packed.set_kept(positions)
    flat[positions] = True
    assert torch.equal(packed.unpack().reshape(-1), flat)
    assert int(packed.count_nonzero()) == int(flat.sum())
    assert int(packed.fill_(True).count_nonzero()) == 37 * 11  # the padding bits stay 0
    assert int(packed.fill_(False).count_nonzero()) == 0
    with pytest.raises(ValueError, match="exceed"):
        packed.write(400, torch.ones(10, dtype=torch.bool))


def test_packed_data_is_never_squashed_in_place_and_has_no_masked_copy():
    data = torch.randn(64, 16)
    before = data.clone()
    sp = MagnitudeSparsifier(sparsity_level=0.5)
    add_mapped(sp, "t", data)
    sp.step()
    with pytest.raises(ValueError, match="write_squashed"):
        sp.get_data("t", return_original=False)
    with pytest.raises(ValueError, match="leave_parametrized=False"):
        sp.squash_mask()
    assert not sp.is_squashed("t") and torch.equal(data, before)
    sp.squash_mask(leave_parametrized=False)
    assert sp.is_squashed("t") and torch.equal(data, before)
    state = sp.state_dict()  # packed bits either way: loads as a plain bool mask
    again = MagnitudeSparsifier()
    again.load_state_dict(state)
    assert torch.equal(again.get_mask("t"), sp.get_mask("t").unpack())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    tensors = {
        "emb.weight": torch.randn(5000, 64),
        "bias": torch.randn(33),
        "half": torch.randn(100, 30).half(),
        "ids": torch.arange(10),
        "bf16": torch.randn(17, 9).bfloat16(),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


@pytest.mark.parametrize("make", [DataNormSparsifier, MagnitudeSparsifier, RowSparsifier])
def test_the_streamed_squash_is_the_in_memory_squash_byte_for_byte(tmp_path, make):
    source = tmp_path / "in.safetensors"
    tensors = _checkpoint(source)
    digest = _sha(source)
    ckpt = open_checkpoint(source, mmap=True)
    assert ckpt.mapped and ckpt.metadata == {"format": "pt"}
    sp = make(sparsity_level=0.7)
    names = [n for n, t in ckpt.tensors.items() if t.is_floating_point()]
    for name in names:
        add_mapped(sp, name, ckpt.tensors[name])
    sp.step()
    out = tmp_path / "out.safetensors"
    written = write_squashed(ckpt.tensors, sp, out, metadata=ckpt.metadata, source=ckpt)

    memory = {n: t.clone() for n, t in tensors.items()}
    ref = make(sparsity_level=0.7)
    for name in names:
        ref.add_data(name, memory[name])
    ref.step()
    kept = {n: int(ref.get_mask(n).count_nonzero()) for n in names}
    ref.squash_mask()
    save_file(memory, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert _sha(source) == digest
    assert written.file_bytes == out.stat().st_size
    saved = sum(
        max(t.numel() * t.element_size() - ((t.numel() + 7) // 8 + kept[n] * t.element_size()), 0)
        for n, t in tensors.items()
        if n in kept
    )
    assert written.compressed_bytes == written.file_bytes - saved
    assert not list(tmp_path.glob("*.partial"))


def test_chunks_removed_whole_are_holes_that_read_as_zeros(tmp_path):
    table = torch.randn(3 << 20).add_(5)  # 12 MiB: three write chunks
    mask = torch.ones_like(table, dtype=torch.bool)
    mask[1 << 20 :] = False  # the last two chunks removed whole: the file ends in a hole
    mask[5] = False
    out = tmp_path / "out.safetensors"
    written = write_squashed({"t": table}, {"t": PackedMask.from_mask(mask)}, out)
    ref = tmp_path / "ref.safetensors"
    save_file({"t": torch.where(mask, table, 0.0)}, str(ref))
    assert out.read_bytes() == ref.read_bytes()
    assert written.file_bytes == out.stat().st_size == ref.stat().st_size


def test_a_torch_file_is_mapped_and_written_as_safetensors(tmp_path):
    torch.manual_seed(6)
    nested = {"model": {"enc.weight": torch.randn(300, 40), "enc.bias": torch.randn(40)}}
    source = tmp_path / "ckpt.pt"
    torch.save(nested, source)
    digest = _sha(source)
    ckpt = open_checkpoint(source, mmap=True)
    assert ckpt.format == "torch" and list(ckpt.tensors) == ["model.enc.weight", "model.enc.bias"]
    sp = DataNormSparsifier(sparsity_level=0.5)
    add_mapped(sp, "model.enc.weight", ckpt.tensors["model.enc.weight"])
    sp.step()
    out = write_squashed(ckpt.tensors, sp, tmp_path / "out.safetensors", source=ckpt).path
    ref = DataNormSparsifier(sparsity_level=0.5)
    weight = nested["model"]["enc.weight"].clone()
    ref.add_data("w", weight)
    ref.step()
    ref.squash_mask()
    written = open_checkpoint(out, mmap=False).tensors
    assert torch.equal(written["model.enc.weight"], weight)
    assert torch.equal(written["model.enc.bias"], nested["model"]["enc.bias"])
    assert _sha(source) == digest


def test_mmap_auto_maps_files_larger_than_the_memory_share(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"t": torch.zeros(1000)}, str(path))
    assert should_map(path, "auto", memory_share=1e-12)
    assert not should_map(path, "auto", memory_share=0.5)
    assert should_map(path, True, 0.5) and not should_map(path, False, 1e-12)
    assert open_checkpoint(path, "auto", memory_share=1e-12).mapped
    with pytest.raises(ValueError, match="must be 'auto', true or false"):
        should_map(path, "yes")


def _mapped_step(tmp_path: Path):
    source = tmp_path / "in.safetensors"
    _checkpoint(source)
    ckpt = open_checkpoint(source, mmap=True)
    sp = MagnitudeSparsifier(sparsity_level=0.5)
    add_mapped(sp, "emb.weight", ckpt.tensors["emb.weight"])
    sp.step()
    return source, ckpt, sp


def test_a_file_changed_on_disk_stops_the_write_on_one_line(tmp_path):
    source, ckpt, sp = _mapped_step(tmp_path)
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched mid-run
    out = tmp_path / "out.safetensors"
    with pytest.raises(FileChangedError, match="changed on disk while in use") as error:
        write_squashed(ckpt.tensors, sp, out, source=ckpt)
    assert "\n" not in str(error.value)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_the_input_file_is_never_the_output(tmp_path):
    source, ckpt, sp = _mapped_step(tmp_path)
    digest = _sha(source)
    with pytest.raises(ValueError, match="is the input checkpoint"):
        write_squashed(ckpt.tensors, sp, source, source=ckpt)
    assert _sha(source) == digest


@pytest.fixture
def tiny_disk(tmpfs):
    """A 1 MiB file system (see ``tmpfs`` in conftest)."""
    return tmpfs("1m")


def test_an_output_that_does_not_fit_is_refused_before_writing(tmp_path, tiny_disk):
    source, ckpt, sp = _mapped_step(tmp_path)
    digest = _sha(source)
    out = tiny_disk / "out.safetensors"
    with pytest.raises(
        NotEnoughSpaceError, match=r"needs 1\.3 MB of disk but its file system has 1\.0 MB free"
    ) as error:
        write_squashed(ckpt.tensors, sp, out, source=ckpt)
    assert "nothing was written" in str(error.value) and "\n" not in str(error.value)
    assert list(tiny_disk.iterdir()) == [] and _sha(source) == digest
