"""Data sources for the runner: each returns the named data to sparsify.

A source is any callable (selected by ``_target_`` in ``conf/data/*.yaml``) that returns a
:class:`DataBundle`. Its signature is its schema: the runner validates a config against the
annotations (pydantic types, ranges and validators) before anything is built. The sources
shipped here:

- :mod:`sparsify_exp.runner.data.tensors`    -- random tensors of configured names and shapes;
- :mod:`sparsify_exp.runner.data.model`      -- the parameters of an ``nn.Module`` (default:
  :class:`MLP`);
- :mod:`sparsify_exp.runner.data.embeddings` -- ``nn.Embedding`` / ``nn.EmbeddingBag`` tables;
- :mod:`sparsify_exp.runner.data.file`       -- a ``.safetensors`` file or a torch state_dict;
- :mod:`sparsify_exp.runner.data.hf`         -- a Hugging Face model folder or hub id.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field
from torch import nn

__all__ = [
    "DataBundle",
    "NonEmpty",
    "as_tensor",
    "select_names",
    "unique_names",
    "write_safetensors",
]

NonEmpty = Annotated[str, Field(min_length=1)]


def unique_names(specs: list[Any]) -> list[Any]:
    """A list of specs whose ``name`` fields are all different."""
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"names must be unique ({', '.join(duplicates)} repeated)")
    return specs


UniqueNames = AfterValidator(unique_names)


@dataclass
class DataBundle:
    """What a data source hands the runner.

    ``named_data`` holds the objects given to ``sparsifier.add_data`` (tensors, parameters,
    embedding modules) in a stable order. ``save(path_without_suffix)`` writes the (by then
    sparsified) data in the input's format and returns the written path.
    """

    named_data: dict[str, torch.Tensor | nn.Module]
    model: nn.Module | None = None
    format: str = "safetensors"
    """``safetensors`` or ``torch``: the format the sparsified data is written in."""
    source: str | None = None
    """Where the data came from (a file path), for the run's tags."""
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tensors written along with the data but not sparsified (excluded names)."""
    payload: Any = None
    """For torch files: the loaded object (mutated in place by ``squash_mask``) to save back."""
    metadata: dict[str, str] = field(default_factory=dict)
    """For safetensors files: the input's header metadata, written back unchanged."""
    mapped: Any = None
    """The :class:`~sparsify_exp.streaming.Checkpoint` when the data is memory-mapped: its
    masks are held packed and ``save`` streams the squash to a new ``.safetensors`` file."""
    tokenizer: Any = None
    """The model's tokenizer (``data=hf``), for evaluators and ``calibration=text``; None
    without one. A source that sets one says ``TOKENIZER = True`` in its module, so a
    calibration=text config is checked before any run."""

    @property
    def suffix(self) -> str:
        return ".safetensors" if self.format == "safetensors" else ".pt"

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor to write: the sparsified ones and the untouched extras."""
        out = {name: as_tensor(obj) for name, obj in self.named_data.items()}
        if self.model is not None:
            # a model's state_dict is the natural checkpoint: buffers and excluded params too
            out = {**dict(self.model.state_dict()), **out}
        out.update(self.extra_tensors)
        return out

    def save(self, stem: Path, masks: Any = None) -> Path:
        """Writes the data; memory-mapped data is written with ``masks`` (the sparsifier)
        applied, a chunk at a time, to a new ``.safetensors`` file."""
        path = stem.with_suffix(self.suffix)
        if self.mapped is not None:
            from sparsify_exp.streaming import write_squashed

            metadata = dict(self.metadata) or None
            write_squashed(self.tensors(), masks, path, metadata=metadata, source=self.mapped)
        elif self.format == "torch":
            from sparsify_exp.atomic import atomic_save

            atomic_save(self.payload if self.payload is not None else self.tensors(), path)
        else:
            write_safetensors(self.tensors(), path, metadata=dict(self.metadata) or None)
        return path

    def save_sparse(
        self, stem: Path, masks: Mapping[str, torch.Tensor], layout: str
    ) -> tuple[Path, dict[str, str]]:
        """Writes the squashed data as one ``.safetensors`` file with each masked name in
        ``layout`` (:func:`sparsify_exp.save_sparse`); returns the file and each masked
        name's layout as written."""
        from sparsify_exp.sparse_format import save_sparse

        path = stem.with_suffix(".safetensors")
        layouts = save_sparse(self.tensors(), path, masks, layout=layout, metadata=self.metadata)
        return path, layouts


def as_tensor(obj: torch.Tensor | nn.Module) -> torch.Tensor:
    """The tensor a sparsifier masks: ``weight`` for embedding modules, else the tensor."""
    if isinstance(obj, nn.Module):
        return obj.weight
    return obj


def select_names(
    names: Iterable[str], include: Iterable[str] | None, exclude: Iterable[str] | None
) -> list[str]:
    """Names matching any ``include`` glob (all when empty) and no ``exclude`` glob."""
    include = list(include or [])
    exclude = list(exclude or [])
    out = []
    for name in names:
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        out.append(name)
    return out


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared/non-contiguous storage (tied weights, views): write copies
    # only where needed so a large checkpoint is not duplicated in memory.
    seen: set[int] = set()
    clean = {}
    for name, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen or not t.is_contiguous():
            t = t.clone().contiguous()
        elif ptr != -1:
            seen.add(ptr)
        clean[name] = t.cpu()
    from sparsify_exp.atomic import atomic_path

    with atomic_path(path) as tmp:  # a killed write never leaves a torn file at ``path``
        save_file(clean, str(tmp), metadata=metadata)
