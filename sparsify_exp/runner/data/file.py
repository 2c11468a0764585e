"""``data=file``: tensors from a real checkpoint.

``.safetensors`` files are read with safetensors; ``.pt`` / ``.pth`` / ``.bin`` files with
``torch.load(weights_only=True)`` (no arbitrary code runs). A torch checkpoint that nests its
tensors (``{"state_dict": {...}}``, ``{"model": {...}}``) is walked; names are the dotted paths.
The sparsified data is written back in the input's format, the untouched entries included.

A file larger than ``mmap_above_memory_share`` of the machine's memory (or any file with
``mmap=true``) is memory-mapped instead of read: the masks are held packed, every step reads
the file in chunks, and the sparsified checkpoint is written to a new ``.safetensors`` file
a chunk at a time (:mod:`sparsify_exp.streaming`; a torch file's dotted names become its keys).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, Field, ValidationInfo, validate_call

from sparsify_exp.runner.data import DataBundle, select_names
from sparsify_exp.streaming import DEFAULT_MEMORY_SHARE, open_checkpoint, should_map

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES

#: Whether this source gives nn.Embedding / nn.EmbeddingBag tables (output.quantize).
EMBEDDING_TABLES = False
MODEL = False  # no nn.Module to run calibration inputs through


def _walk(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(dotted name, tensor)`` of a loaded torch checkpoint; a bare tensor is named
    ``prefix`` (the file's stem)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, MutableMapping):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))


def _torch_tensors(payload: Any, path: Path) -> list[tuple[str, torch.Tensor]]:
    return list(_walk(payload, path.stem if isinstance(payload, torch.Tensor) else ""))


def sparsifiable(t: torch.Tensor) -> bool:
    """Floating tensors with at least one dimension (ints, bools and scalars stay as they are)."""
    return t.is_floating_point() and t.dim() >= 1 and t.numel() > 0


def format_list(values: list[str] | None) -> str:
    return "[" + ", ".join(values or []) + "]"


def list_names(path: str | Path) -> list[str]:
    """Names of the sparsifiable tensors in ``path`` (safetensors: header only, no data read)."""
    path = Path(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = []
            for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(k)
                shape = sl.get_shape()
                if sl.get_dtype().startswith(("F", "BF")) and len(shape) >= 1 and 0 not in shape:
                    names.append(k)
            return names
    return [n for n, t in _torch_tensors(_load_torch(path, mmap=True), path) if sparsifiable(t)]


def _load_torch(path: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``: no code in the file runs. ``mmap`` maps the tensors
    instead of reading them (for listing names; old non-zip files are read)."""
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors for custom classes
        raise ValueError(
            f"{path}: cannot load with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); save a plain "
            "state_dict of tensors or convert the checkpoint to .safetensors"
        ) from e


def _checkpoint(path: str) -> str:
    """A readable checkpoint: a known suffix, the file is there, and it holds named floating
    tensors with entries (a state_dict, not a list; not only 0-size tensors)."""
    p = Path(path).expanduser()
    if p.suffix not in SUFFIXES:
        raise ValueError(f"must end in one of: {', '.join(SUFFIXES)}")
    if not p.is_file():
        raise ValueError(f"no such file ({p if p.is_absolute() else Path.cwd() / p})")
    payload = None
    try:
        if p.suffix in TORCH_SUFFIXES:
            payload = _load_torch(p, mmap=True)
        names = list_names(p)
    except Exception as e:
        raise ValueError(f"not readable: {e}") from e
    if payload is not None and not isinstance(payload, (torch.Tensor, MutableMapping)):
        raise ValueError(
            f"{p} holds {_what(payload)}, not tensors by name; save a dict "
            "(a state_dict: name -> tensor)"
        )
    if not names:
        raise ValueError(
            f"{p} holds no floating tensor with entries to sparsify (it holds: {_contents(p)})"
        )
    return path


def _what(obj: Any) -> str:
    """``a list of 3 tensors``, ``a str``: what a torch file holds, in words."""
    if isinstance(obj, (list, tuple)):
        kinds = {type(v).__name__ for v in obj}
        of = "tensors" if kinds == {"Tensor"} else "items (" + ", ".join(sorted(kinds)) + ")"
        return f"a {type(obj).__name__} of {len(obj)} {of}"
    return f"a {type(obj).__name__}"


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _contents(p: Path, limit: int = 8) -> str:
    """The first tensors of a checkpoint with dtype and shape (``w float32 0x4, ...``)."""
    if p.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            slices = [(k, f.get_slice(k)) for k in list(f.keys())[: limit + 1]]
            items = [
                (k, _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower()), sl.get_shape())
                for k, sl in slices
            ]
    else:
        tensors = _torch_tensors(_load_torch(p, mmap=True), p)[: limit + 1]
        items = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in tensors]
    if not items:
        return "nothing"
    text = ", ".join(f"{n} {d} {'x'.join(map(str, s)) or 'scalar'}" for n, d, s in items[:limit])
    return text + (", ..." if len(items) > limit else "")


def _selects_something(include: list[str], info: ValidationInfo) -> list[str]:
    """The patterns select at least one floating tensor (read from the header or the file)."""
    data = info.data or {}  # empty when build() itself is called: it checks as it loads
    path, exclude = data.get("path"), data.get("exclude", ())
    if path is None:
        return include  # the path was reported
    names = list_names(Path(path).expanduser())
    if not select_names(names, include, exclude):
        raise ValueError(
            f"with data.exclude={format_list(exclude)} selects no floating tensor (available: "
            f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
        )
    return include


@validate_call
def build(
    path: Annotated[str, AfterValidator(_checkpoint)],
    *,
    exclude: list[str] | None = None,
    include: Annotated[list[str] | None, AfterValidator(_selects_something)] = None,
    mmap: Literal["auto"] | bool = "auto",
    mmap_above_memory_share: Annotated[float, Field(gt=0)] = DEFAULT_MEMORY_SHARE,
) -> DataBundle:
    """The floating tensors of the checkpoint at ``path`` that ``include`` and ``exclude``
    (glob patterns) select; the rest is written back unchanged. ``mmap``: ``auto`` maps the
    file when it is larger than ``mmap_above_memory_share`` of the machine's memory, ``true``
    always, ``false`` never."""
    p = Path(path).expanduser()
    if should_map(p, mmap, mmap_above_memory_share):
        return _mapped(p, include, exclude)
    if p.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open
        from safetensors.torch import load_file

        tensors = load_file(str(p), backend="pread")  # in memory: the squash writes in place
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        items = list(tensors.items())
        fmt, payload = "safetensors", None
    else:
        payload = _load_torch(p)
        items = _torch_tensors(payload, p)
        fmt, meta = "torch", {}
    candidates = [n for n, t in items if sparsifiable(t)]
    names = set(select_names(candidates, include, exclude))
    if not names:
        raise ValueError(
            f"data.include={list(include or [])} / data.exclude={list(exclude or [])}: no "
            f"floating tensor of {p} selected (available: {', '.join(candidates[:20])})"
        )
    named = {n: t for n, t in items if n in names}
    extra = {n: t for n, t in items if n not in names}
    return DataBundle(
        named_data=named,
        format=fmt,
        source=str(p),
        extra_tensors=extra,
        payload=payload,
        metadata=dict(meta),
    )


def _mapped(p: Path, include: list[str] | None, exclude: list[str] | None) -> DataBundle:
    """The checkpoint memory-mapped: its tensors stay file-backed."""
    try:
        ckpt = open_checkpoint(p, mmap=True)
    except Exception as e:  # pickle errors for custom classes, a torn header
        raise ValueError(f"{p}: cannot memory-map ({type(e).__name__}: {e})") from e
    candidates = [n for n, t in ckpt.tensors.items() if sparsifiable(t)]
    chosen = set(select_names(candidates, include, exclude))
    return DataBundle(
        named_data={n: t for n, t in ckpt.tensors.items() if n in chosen},
        format="safetensors",
        source=str(p),
        extra_tensors={n: t for n, t in ckpt.tensors.items() if n not in chosen},
        metadata=dict(ckpt.metadata),
        mapped=ckpt,
    )


def names(
    path: str, include: list[str] | None = None, exclude: list[str] | None = None, **_: object
) -> list[str]:
    """The names :func:`build` selects, read from the header (safetensors) or a memory-mapped
    load (torch), for validation."""
    return select_names(list_names(Path(path).expanduser()), include, exclude)
