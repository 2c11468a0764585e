"""``data=file data.mmap=true``: the run through the CLI, memory-mapped, gives what the
in-memory run gives (masks, sparsified file, compressed size) and leaves the input as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparsify_exp.masks import load_masks
from sparsify_exp.runner import run_overrides
from sparsify_exp.streaming import open_checkpoint


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _table(path: Path) -> None:
    torch.manual_seed(0)
    tensors = {
        "emb.weight": torch.randn(20000, 64),
        "bias": torch.randn(64),
        "ids": torch.arange(5),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})


def _outputs(job: Path) -> tuple[dict[str, torch.Tensor], Path]:
    artifacts = job / "artifacts"
    return load_masks(artifacts / "masks" / "final.safetensors"), artifacts / "data"


@pytest.mark.parametrize("sparsifier", ["data_norm", "magnitude"])
def test_a_memory_mapped_run_gives_the_in_memory_result(store, cli, tmp_path, sparsifier):
    source = tmp_path / "in.safetensors"
    _table(source)
    digest = _sha(source)
    common = [
        "data=file",
        f"data.path={source}",
        f"sparsifier={sparsifier}",
        "sparsifier.sparsity_level=0.8",
        "mlflow.mask_images=0",
    ]
    proc = cli([*common, "data.mmap=true", f"hydra.run.dir={tmp_path / 'mapped'}"], cwd=store.dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    memory_id = run_overrides([*common, "data.mmap=false"], output_dir=tmp_path / "memory")

    mapped_masks, mapped_data = _outputs(tmp_path / "mapped")
    memory_masks, memory_data = _outputs(tmp_path / "memory")
    assert mapped_masks.keys() == memory_masks.keys() == {"emb.weight", "bias"}
    for name, mask in memory_masks.items():
        assert torch.equal(mapped_masks[name], mask), name
    out = mapped_data / "sparsified.safetensors"
    assert out.read_bytes() == (memory_data / "sparsified.safetensors").read_bytes()
    assert _sha(source) == digest
    (mapped_run,) = [r for r in store.runs() if r.info.run_id != memory_id]
    memory_run = store.client.get_run(memory_id)
    for key in ("size/compressed_bytes", "size/dense_bytes", "sparsity/overall"):
        assert mapped_run.data.metrics[key] == memory_run.data.metrics[key], key
    assert mapped_run.data.params["data.mmap"] == "True"


def test_a_memory_mapped_torch_checkpoint_is_written_as_safetensors(store, tmp_path):
    torch.manual_seed(1)
    source = tmp_path / "ckpt.pt"
    nested = {"state_dict": {"enc.weight": torch.randn(400, 32), "step": torch.tensor(3)}}
    torch.save(nested, source)
    digest = _sha(source)
    common = ["data=file", f"data.path={source}", "sparsifier=magnitude", "mlflow.mask_images=0"]
    run_overrides([*common, "data.mmap=true"], output_dir=tmp_path / "mapped")
    run_overrides([*common, "data.mmap=false"], output_dir=tmp_path / "memory")
    mapped = open_checkpoint(tmp_path / "mapped/artifacts/data/sparsified.safetensors").tensors
    memory = torch.load(tmp_path / "memory/artifacts/data/sparsified.pt", weights_only=True)
    assert torch.equal(mapped["state_dict.enc.weight"], memory["state_dict"]["enc.weight"])
    assert torch.equal(mapped["state_dict.step"], memory["state_dict"]["step"])
    assert _sha(source) == digest


@pytest.fixture
def tiny_disk(tmpfs):
    """A 2 MiB file system (see ``tmpfs`` in conftest)."""
    return tmpfs("2m")


def test_an_output_that_does_not_fit_fails_the_run_on_one_line(store, cli, tmp_path, tiny_disk):
    source = tmp_path / "in.safetensors"
    _table(source)  # 4.9 MiB: its masks and pictures fit the 2 MiB disk, its data does not
    digest = _sha(source)
    proc = cli(
        [
            "data=file",
            f"data.path={source}",
            "data.mmap=true",
            "eval=[]",
            f"hydra.run.dir={tiny_disk}/run",
        ],
        cwd=store.dir,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    (run,) = store.runs()
    assert run.info.status == "FAILED"
    reason = run.data.tags["sparsify.failure"]
    assert "of disk but its file system has" in reason and "nothing was written" in reason
    assert not list((tiny_disk / "run").rglob("sparsified*"))
    assert _sha(source) == digest
