"""Checkpoints larger than memory: open them memory-mapped, step with packed masks, and write
the sparsified checkpoint to a new ``.safetensors`` file a chunk at a time.

    ckpt = open_checkpoint("tables.safetensors", mmap="auto")   # file-backed tensors
    sp = DataNormSparsifier(sparsity_level=0.8)
    for name, tensor in ckpt.tensors.items():
        add_mapped(sp, name, tensor)        # the mask at 1 bit an entry
    sp.step()                               # reads the file in chunks
    written = write_squashed(ckpt.tensors, sp, "sparse.safetensors", source=ckpt)

A mapped tensor's pages belong to the file, not to the process: the kernel reads them on
demand and drops them under pressure, so a step's own memory is its chunks, the candidates
near the threshold and the packed masks. The input file is never written to.
"""

from __future__ import annotations

import json
import mmap as mmap_module
import os
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsify_exp.atomic import partial_path
from sparsify_exp.sparsifier.mask_bits import packed_nbytes
from sparsify_exp.sparsifier.packed_mask import PackedMask
from sparsify_exp.sparsifier.packed_select import ReadAhead
from sparsify_exp.sparsifier.select import flat_views
from sparsify_exp.units import human_bytes

__all__ = [
    "Checkpoint",
    "FileChangedError",
    "NotEnoughSpaceError",
    "Written",
    "add_mapped",
    "memory_bytes",
    "open_checkpoint",
    "should_map",
    "write_squashed",
]

#: ``mmap="auto"`` maps a file larger than this share of the machine's memory.
DEFAULT_MEMORY_SHARE = 0.5
SAFETENSORS_SUFFIXES = (".safetensors",)
_WRITE_ENTRIES = 1 << 22  # entries written at a time


class FileChangedError(RuntimeError):
    """A memory-mapped file changed on disk while it was in use."""


class NotEnoughSpaceError(OSError):
    """The output would not fit in the free space of its file system."""


def memory_bytes() -> int:
    """The memory this process may use: physical memory, or a smaller cgroup limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def should_map(
    path: str | os.PathLike, mmap: bool | str = "auto", memory_share: float = DEFAULT_MEMORY_SHARE
) -> bool:
    """``mmap=True``/``False`` as given; ``"auto"``: whether the file is larger than
    ``memory_share`` of :func:`memory_bytes`."""
    if mmap == "auto":
        return Path(path).stat().st_size > memory_share * memory_bytes()
    if not isinstance(mmap, bool):
        raise ValueError(f"mmap={mmap!r}: must be 'auto', true or false")
    return mmap


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@dataclass
class Checkpoint:
    """The tensors of a checkpoint file by (dotted) name; memory-mapped when ``mapped``."""

    path: Path
    format: str
    """``safetensors`` or ``torch``."""
    tensors: dict[str, torch.Tensor]
    mapped: bool
    metadata: dict[str, str] = field(default_factory=dict)
    """A safetensors file's header metadata."""
    payload: Any = None
    """A torch file's loaded object (nested dicts of tensors)."""
    stamp: tuple[int, int] = (0, 0)
    """Size and mtime (ns) when opened: :meth:`check_unchanged` compares them."""

    def check_unchanged(self) -> None:
        """Raises :class:`FileChangedError` if the file's size or mtime differ from when it
        was opened: its memory-mapped tensors may then mix old and new bytes."""
        try:
            now = _stamp(self.path)
        except OSError as error:
            raise FileChangedError(f"{self.path}: gone while in use ({error.strerror})") from None
        if now != self.stamp:
            raise FileChangedError(
                f"{self.path}: changed on disk while in use (size {self.stamp[0]} -> {now[0]} "
                "bytes or its mtime); its memory-mapped tensors may mix old and new data, so "
                "nothing was written; run again on a file that stays as it is"
            )


def _walk(obj: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, Mapping):
        return [
            item
            for key, value in obj.items()
            for item in _walk(value, f"{prefix}.{key}" if prefix else str(key))
        ]
    return []


def open_checkpoint(
    path: str | os.PathLike,
    mmap: bool | str = "auto",
    memory_share: float = DEFAULT_MEMORY_SHARE,
) -> Checkpoint:
    """The tensors of a ``.safetensors`` file (``safetensors.safe_open``) or a torch file
    (``torch.load(weights_only=True)``), memory-mapped when :func:`should_map` says so and
    read into memory otherwise. Nested torch checkpoints are named by dotted paths; a bare
    tensor by the file's stem."""
    path = Path(path)
    stamp = _stamp(path)
    mapped = should_map(path, mmap, memory_share)
    if path.suffix in SAFETENSORS_SUFFIXES:
        if mapped:
            tensors, metadata = _map_safetensors(path)
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", backend="pread") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
                metadata = dict(f.metadata() or {})
        return Checkpoint(path, "safetensors", tensors, mapped, metadata, stamp=stamp)
    if mapped:
        # shared, so that a file larger than memory can be mapped at all (a private mapping
        # of it is refused: the kernel would have to promise memory for every page); the
        # tensors are only ever read
        with torch.serialization.set_default_mmap_options(mmap_module.MAP_SHARED):
            payload = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    else:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    tensors = dict(_walk(payload, path.stem if isinstance(payload, torch.Tensor) else ""))
    return Checkpoint(path, "torch", tensors, mapped, payload=payload, stamp=stamp)


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file over one read-only shared mapping of it.

    Read-only and shared: a mapping that could be written (``safe_open``'s, private) of a
    file larger than memory is refused by the kernel's overcommit check, and a read-only
    one cannot change the input: writing to these tensors is a crash, not a change.
    """
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        mapping = mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ)
    metadata = dict(header.pop("__metadata__", None) or {})
    tensors = {}
    with warnings.catch_warnings():  # torch warns that the buffer is read-only: it is meant to be
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for name, info in header.items():
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, not mapped")
            shape = [int(s) for s in info["shape"]]
            begin, end = info["data_offsets"]
            count = (end - begin) // dtype.itemsize
            if count == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            flat = torch.frombuffer(mapping, dtype=dtype, count=count, offset=8 + size + begin)
            tensors[name] = flat.view(shape)
    return tensors, metadata


def add_mapped(sparsifier: Any, name: str, data: torch.Tensor, **config: Any) -> torch.Tensor:
    """``sparsifier.add_data`` with the mask held packed (1 bit an entry): the data is then
    never written to and every step reads it in chunks."""
    return sparsifier.add_data(
        name, data, mask=PackedMask.full(data.shape, device=data.device), **config
    )


@dataclass(frozen=True)
class Written:
    """A checkpoint written by :func:`write_squashed`."""

    path: Path
    file_bytes: int
    compressed_bytes: int
    """``file_bytes`` with each masked tensor stored as a 1-bit mask plus its kept values
    (or dense where that is smaller): what the run's ``size/compressed_bytes`` reports."""


def _header(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[str]]:
    """The safetensors header (as ``safetensors.torch.save_file`` writes it: its tensor
    order and dtype names, padded to 8 bytes) and the order the tensors' bytes follow in."""
    from safetensors.torch import save

    # safetensors' own order and dtype names, from a header of empty stand-ins
    probe = save({name: torch.empty(0, dtype=t.dtype) for name, t in tensors.items()})
    entries = json.loads(probe[8 : 8 + int.from_bytes(probe[:8], "little")])
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    order = [name for name in entries if name != "__metadata__"]
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": entries[name]["dtype"],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (-len(text) % 8), order


def _masks_of(masks: Any, names: list[str]) -> dict[str, Any]:
    if hasattr(masks, "get_mask") and hasattr(masks, "data_groups"):
        return {n: masks.get_mask(n) for n in names if n in masks.data_groups}
    return {n: masks[n] for n in names if n in masks}


def _keep(mask: Any, start: int, stop: int) -> torch.Tensor:
    if isinstance(mask, PackedMask):
        return mask.read(start, stop)
    flat = mask.reshape(-1)[start:stop]
    return flat if flat.dtype == torch.bool else flat != 0


def _hole_bytes(tensor: torch.Tensor, mask: Any) -> int:
    """Bytes of the chunks of ``tensor`` that ``mask`` removes whole (left as holes)."""
    holes = 0
    for start, view in flat_views(tensor, _WRITE_ENTRIES):
        stop = start + view.numel()
        if isinstance(mask, PackedMask) and start % 8 == 0:
            kept = bool(mask.bits[start // 8 : -(-stop // 8)].any())
        else:
            kept = bool(_keep(mask, start, stop).any())
        holes += 0 if kept else view.numel() * view.element_size()
    return holes


def _write_tensor(f: Any, tensor: torch.Tensor, mask: Any) -> int:
    """Writes ``tensor`` (masked: removed entries become 0) a chunk at a time; returns the
    entries its mask keeps. A chunk the mask removes whole is skipped, not written: the file
    system keeps it as a hole, which reads as zeros and takes no disk."""
    kept = 0
    tensor = tensor.detach().cpu() if tensor.device.type != "cpu" else tensor.detach()
    ahead = ReadAhead(tensor) if tensor.is_contiguous() else None
    for start, view in flat_views(tensor, _WRITE_ENTRIES):
        chunk = view.reshape(-1)
        if ahead is not None:
            ahead.at((start + chunk.numel()) * chunk.element_size())
        if mask is not None:
            keep = _keep(mask, start, start + chunk.numel())
            count = int(torch.count_nonzero(keep))
            kept += count
            if count == 0:
                f.seek(chunk.numel() * chunk.element_size(), os.SEEK_CUR)
                continue
            chunk = torch.where(keep.to(chunk.device), chunk, chunk.new_zeros(()))
        f.write(chunk.contiguous().view(torch.uint8).numpy().data)
    return kept


def write_squashed(
    tensors: Mapping[str, torch.Tensor],
    masks: Any,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    source: Checkpoint | None = None,
) -> Written:
    """Writes ``tensors`` to a new ``.safetensors`` file at ``path``, each one that ``masks``
    (a sparsifier, or ``{name: mask}`` of bool tensors or :class:`PackedMask`) names with its
    removed entries zeroed, a chunk at a time: the bytes ``safetensors.torch.save_file``
    writes for the squashed tensors, without holding any of them in memory. Chunks of
    :data:`_WRITE_ENTRIES` entries that a mask removes whole are left as holes (a sparse
    file), so a table whose tail is pruned takes less disk than its size.

    Before anything is written: ``path`` must not be ``source``'s file, its file system
    must have room for the whole file (:class:`NotEnoughSpaceError`), and ``source`` must
    be unchanged on disk (:class:`FileChangedError`, checked again once written). The file
    appears at ``path`` only when complete (written beside it, then renamed).
    """
    path = Path(path)
    if source is not None and path.exists() and os.path.samefile(path, source.path):
        raise ValueError(f"{path}: is the input checkpoint; write the squash to a new file")
    header, order = _header(tensors, metadata)
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    total = 8 + len(header) + payload
    chosen = _masks_of(masks, order)
    for name, mask in chosen.items():
        if tuple(mask.shape) != tuple(tensors[name].shape):
            raise ValueError(
                f"{name!r}: a mask of shape {tuple(mask.shape)} does not fit a tensor of shape "
                f"{tuple(tensors[name].shape)}"
            )
    needed = total - sum(_hole_bytes(tensors[n], m) for n, m in chosen.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise NotEnoughSpaceError(
            f"{path}: the sparsified checkpoint needs {human_bytes(needed)} of disk but its file "
            f"system has {human_bytes(free)} free; nothing was written"
        )
    if source is not None:
        source.check_unchanged()
    partial = partial_path(path)  # a leftover of a killed write: atomic.remove_leftovers
    saved = 0
    try:
        with open(partial, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for name in order:
                tensor, mask = tensors[name], chosen.get(name)
                kept = _write_tensor(f, tensor, mask)
                if mask is not None:
                    dense = tensor.numel() * tensor.element_size()
                    encoded = packed_nbytes(tensor.numel()) + kept * tensor.element_size()
                    saved += max(dense - encoded, 0)
            f.truncate(total)  # the size, even when the file ends in a hole
            f.flush()
            os.fsync(f.fileno())
        if source is not None:
            source.check_unchanged()
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return Written(path, total, total - saved)
