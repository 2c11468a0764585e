"""Checkpoints of a running job, so ``resume=<run id or job dir>`` continues it to the same
masks: every ``checkpoint.every`` steps the job writes ``<job dir>/checkpoint.pt`` (atomically:
a crash mid-write leaves the previous one) with the step, the masks (1 bit an entry), each
name's config, the scheduler's state, the model's state (or the data's, without a model: what
training changes) and torch's RNG state. It loads with ``torch.load(weights_only=True)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify_exp.atomic import atomic_save
from sparsify_exp.sparsifier.mask_bits import pack_mask, unpack_mask
from sparsify_exp.sparsifier.packed_mask import PackedMask

FILE = "checkpoint.pt"


def save(
    job_dir: Path,
    step: int,
    sparsifier: Any,
    scheduler: Any,
    model: nn.Module | None,
    mapped: bool = False,
) -> Path:
    """``mapped``: the data is a read-only memory map of the input file, which never
    changes; it is not copied into the checkpoint (it may be larger than memory)."""
    names = list(sparsifier.data_groups)
    state = {
        "step": step,
        "masks": {n: pack_mask(sparsifier.get_mask(n)) for n in names},
        "data_groups": {n: dict(sparsifier.data_groups[n]) for n in names},
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "model": model.state_dict() if model is not None else None,
        "data": None
        if model is not None or mapped
        else {n: sparsifier.get_data(n, return_original=True) for n in names},
        "rng": torch.get_rng_state(),
    }
    return atomic_save(state, job_dir / FILE)


def load(job_dir: Path) -> dict[str, Any] | None:
    path = job_dir / FILE
    return torch.load(path, weights_only=True) if path.is_file() else None


@torch.no_grad()
def restore(
    state: dict[str, Any],
    sparsifier: Any,
    scheduler: Any,
    model: nn.Module | None,
    mapped: bool = False,
):
    """Puts a freshly built job back where the checkpoint was; returns the step it holds.

    ``mapped``: the data is a read-only memory map of the input (writing into it is a
    segfault, and it never changed): only the masks, packed, are restored."""
    if model is not None:
        model.load_state_dict(state["model"])
    for name, data in (state["data"] or {}).items():
        if not mapped:
            sparsifier.get_data(name, return_original=True).copy_(data)
    for name, packed in state["masks"].items():
        mask = sparsifier.get_mask(name)
        if isinstance(mask, PackedMask):  # held packed: its bytes are the checkpoint's
            mask.bits.copy_(packed.to(mask.bits.device).reshape(mask.bits.shape))
        else:
            mask.copy_(unpack_mask(packed, list(mask.shape)))
        sparsifier.data_groups[name].update(state["data_groups"][name])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])
