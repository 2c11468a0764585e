"""Files that appear under their final name only when complete.

A process killed while writing (``kill -9``, a lost node, a full disk) must not leave a
truncated checkpoint where a reader expects a whole one: every file is written to a hidden
partial file beside its final name (``.sparsified.pt.partial``), flushed, then renamed over
the final name in one step. What a killed writer leaves behind is recognisable
(:func:`is_leftover`: these partial files, and the ``.tmpXXXXXX`` files that safetensors
itself writes before its own rename) and :func:`remove_leftovers` deletes it; the runner
calls it on a job folder it owns (a new job, a resume, a sync). Torch only.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_save", "atomic_write_text", "is_leftover", "remove_leftovers"]

PARTIAL_SUFFIX = ".partial"
#: safetensors (0.4+) writes ``.tmp`` + 6 random characters beside the target, then renames.
_SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def partial_path(path: str | os.PathLike) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def is_leftover(name: str) -> bool:
    """Whether a file name is a partial write (ours or safetensors')."""
    return (name.startswith(".") and name.endswith(PARTIAL_SUFFIX)) or bool(
        _SAFETENSORS_TMP.fullmatch(name)
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yields the partial path to write ``path`` to; renames it into place when the block
    ends normally, deletes it when the block raises. An ``OSError`` without a file name
    (``[Errno 28] No space left on device`` from a write) gets ``path`` as its file name,
    so the message says which file could not be written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and not e.filename and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        if isinstance(e, RuntimeError) and "write" in str(e) and str(path) not in str(e):
            # torch.save on a full disk: "PytorchStreamWriter failed writing file ..."
            raise OSError(f"{path}: could not be written ({e})") from e
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, appearing at ``path`` only when complete."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text``, appearing at ``path`` only when complete."""
    with atomic_path(path, fsync=False) as tmp:
        tmp.write_text(text)
    return Path(path)


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Deletes the partial writes under ``folder`` (see :func:`is_leftover`); returns them.
    Call it only on a folder no live process is writing to."""
    removed = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if is_leftover(name):
                p = Path(root) / name
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed
