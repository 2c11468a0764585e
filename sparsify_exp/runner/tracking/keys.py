"""How a data name appears in MLflow keys and in file names: as itself when it can, else
cleaned, bounded and given a stable short hash of the exact name, so that no name breaks a
run and no two names share a key or a file.

MLflow accepts keys of at most 250 characters made of letters, digits, ``_ - . / space``
whose path form is normal (no ``..`` or ``.`` segment, no ``//``, no leading or trailing
``/``). File systems take names of at most 255 bytes. Greek ``alpha.w`` and ``beta.w`` would
both clean to ``_.w``, and ``dup/x`` and ``dup_x`` would share ``dup_x.png``: a name that
cleaning changes gets ``-<8 hex digits of sha1(name)>`` appended, a name that fits as is stays
as is. The exact name is always in ``per_name.csv`` and the mask file.
"""

from __future__ import annotations

import hashlib
import posixpath
import re

__all__ = ["MAX_KEY_LENGTH", "name_file_stem", "per_name_key", "short_hash"]

#: MLflow's limit on metric, param and tag keys.
MAX_KEY_LENGTH = 250
#: Longest file stem made from a name (well under the 255 bytes of common file systems).
MAX_STEM = 120

_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. /]")
_PLAIN_FILE = re.compile(r"[0-9A-Za-z_\-.]+")


def short_hash(name: str) -> str:
    """8 hex digits of the name's sha1: the same name gets the same suffix in every run."""
    return hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _normal(key: str) -> bool:
    return posixpath.normpath(key) == key and not key.startswith("/")


def _cleaned(name: str) -> str:
    """The name with every character MLflow or a file system refuses (and ``/``) as ``_``;
    only dots (``.``, ``..``) become underscores too."""
    clean = _BAD_KEY_CHARS.sub("_", name).replace("/", "_")
    return clean.replace(".", "_") if not clean.strip(".") else clean


def per_name_key(prefix: str, name: str) -> str:
    """``<prefix>/<name>``: as is when MLflow accepts it, else ``<prefix>/<cleaned
    name>-<hash>`` cut to :data:`MAX_KEY_LENGTH` characters."""
    key = f"{prefix}/{name}"
    if not _BAD_KEY_CHARS.search(name) and len(key) <= MAX_KEY_LENGTH and _normal(key):
        return key
    tag = f"-{short_hash(name)}"
    room = max(MAX_KEY_LENGTH - len(prefix) - 1 - len(tag), 1)
    return f"{prefix}/{_cleaned(name)[:room]}{tag}"


def name_file_stem(name: str) -> str:
    """A file name (without suffix) for ``name``: the name itself when it is plain (letters,
    digits, ``_ - .``, not hidden, at most :data:`MAX_STEM` characters), else the cleaned name
    cut short plus ``-<hash>``."""
    if _PLAIN_FILE.fullmatch(name) and not name.startswith(".") and len(name) <= MAX_STEM:
        return name
    tag = f"-{short_hash(name)}"
    clean = _cleaned(name).replace(" ", "_").lstrip(".") or "_"
    return clean[: MAX_STEM - len(tag)] + tag
