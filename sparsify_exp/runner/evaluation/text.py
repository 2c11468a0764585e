"""Held-out text for the model evaluators: where it comes from and how it is batched.

``text`` is a file, a folder (its ``.txt`` and ``.md`` files, sorted, recursively), a list
of strings, or ``stdlib:heldout`` / ``stdlib:calibration``: English prose from the
docstrings of two disjoint sets of Python standard-library modules (on every machine that
runs Python, nothing to download). A file or docstring is split into samples at blank lines
(paragraphs); the first ``max_samples`` non-empty samples are used, each cut to ``seq_len``
tokens.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

TEXT_SUFFIXES = (".txt", ".md")
STDLIB = "stdlib:"
STDLIB_SPLITS = {
    "heldout": (
        "argparse", "csv", "datetime", "functools", "json", "logging", "pathlib", "shutil",
        "string", "subprocess", "textwrap", "threading",
    ),
    "calibration": (
        "asyncio", "collections", "decimal", "email", "fractions", "heapq", "http.client",
        "inspect", "itertools", "os", "pickle", "random", "socket", "tarfile", "unittest",
        "zipfile",
    ),
}  # fmt: skip


def stdlib_texts(split: str) -> list[str]:
    """Paragraphs of prose (at least 8 words, no ``>>>`` examples) from the docstrings of the
    modules of ``split``, and of their public classes, methods and functions, in name order."""
    if split not in STDLIB_SPLITS:
        raise ValueError(f"text={STDLIB}{split}: must be one of {', '.join(STDLIB_SPLITS)}")
    out: list[str] = []
    for module_name in STDLIB_SPLITS[split]:
        module = importlib.import_module(module_name)
        docs = [inspect.getdoc(module) or ""]
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for attr, member in sorted(vars(obj).items()):
                    if not attr.startswith("_") and callable(member):
                        docs.append(inspect.getdoc(member) or "")
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                words = para.split()
                prose = sum(w.isalpha() for w in words) > len(words) / 2
                if len(words) >= 8 and ">>>" not in para and prose:
                    out.append(" ".join(words))
    return list(dict.fromkeys(out))  # a docstring inherited twice counts once


def load_texts(text: str | Sequence[str], max_samples: int) -> list[str]:
    """The samples of ``text`` (see the module); a path that does not exist or holds no text
    raises a one-line ``ValueError``."""
    if isinstance(text, str) and text.startswith(STDLIB):
        samples = stdlib_texts(text.removeprefix(STDLIB))
    elif isinstance(text, str):
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
        elif path.is_file():
            files = [path]
        else:
            raise ValueError(
                f"text={text}: no such file or folder (or a list of strings, stdlib:heldout)"
            )
        samples: list[str] = []
        for file in files:
            parts = re.split(r"\n\s*\n", file.read_text(encoding="utf-8", errors="replace"))
            samples.extend(" ".join(p.split()) for p in parts if p.strip())
            if len(samples) >= max_samples:
                break
    else:
        samples = [" ".join(str(s).split()) for s in text if str(s).strip()]
    if not samples:
        raise ValueError(f"text={text!r}: no non-empty text found")
    return samples[:max_samples]


def batches(
    model: Any, tokenizer: Any, texts: list[str], seq_len: int, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """``input_ids`` and ``attention_mask`` batches on the model's device (padded on the
    right with the tokenizer's pad id, else 0), each sample cut to ``seq_len`` tokens (or the
    model's positions, when fewer)."""
    device = device_of(model)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    seq_len = fit_length(model, seq_len)
    encoded = [
        tokenizer(t, truncation=True, max_length=seq_len)["input_ids"][:seq_len] for t in texts
    ]
    encoded = [ids for ids in encoded if ids]
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        yield {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def require_model(name: str, ctx: Any, causal: bool = False) -> tuple[Any, Any]:
    """The context's model and tokenizer, or a one-line error saying which data source gives
    them."""
    if ctx.model is None:
        raise ValueError(f"{name} needs a model with a tokenizer: use data=hf")
    if ctx.tokenizer is None:
        raise ValueError(
            f"{name} needs the model's tokenizer, and the data source has none "
            "(data=hf with a folder that holds tokenizer files)"
        )
    return ctx.model, ctx.tokenizer


def fit_length(model: Any, seq_len: int) -> int:
    """``seq_len``, cut to the positions the model has (``max_position_embeddings``)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
    return min(seq_len, int(limit)) if limit else seq_len


def device_of(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters())).device
