"""Where calibration inputs come from: ``calibration=batches`` and ``calibration=text``.

Each option is a class built from its config node (its signature is its schema, checked up
front); :meth:`prepare` turns it into the batches for one forward pass each, once the data
source (its model, its tokenizer) exists.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field

__all__ = ["BatchCalibration", "TextCalibration", "read_texts"]

TEXT_SUFFIXES = (".txt", ".md")


class BatchCalibration:
    """``calibration=batches``: model inputs from ``batches._target_`` (any callable returning
    an iterable of batches: a tensor, a tuple of positional arguments, or a mapping of keyword
    arguments for ``model(...)``), at most ``max_batches`` of them."""

    unit = "batches"

    def __init__(
        self,
        batches: dict[str, Any],
        max_batches: Annotated[int, Field(ge=1)] | None = None,
    ) -> None:
        self.batches = batches
        self.max_batches = max_batches

    def prepare(self, bundle: Any) -> Iterable[Any]:
        node = self.batches
        made: Any = node
        if isinstance(node, Mapping) and "_target_" in node:
            from hydra.utils import instantiate

            made = instantiate(node, _convert_="all")
        try:
            batches = iter(made)
        except TypeError:
            raise TypeError(
                f"calibration.batches._target_={node.get('_target_')}: must return an "
                f"iterable of model inputs; got {type(made).__name__}"
            ) from None
        if self.max_batches is not None:
            batches = itertools.islice(batches, self.max_batches)
        if isinstance(made, (list, tuple)):
            return list(batches)  # a length: the progress bar has a total
        return batches

    @staticmethod
    def count(batch: Any) -> int:
        return 1


def _check_texts(value: str | list[str]) -> str | list[str]:
    """A file or folder holding text (``.txt``/``.md``), or a non-empty list of strings."""
    if isinstance(value, list):
        if not value:
            raise ValueError("the list of texts is empty")
        blank = [i for i, text in enumerate(value) if not str(text).strip()]
        if blank:
            raise ValueError(f"text [{blank[0]}] is empty ({len(blank)} empty in all)")
        return value
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError("no such file or folder (a file, a folder of .txt/.md, or a list)")
    texts = read_texts(value)
    if not texts:
        what = f"holds no non-empty {'/'.join(TEXT_SUFFIXES)} file" if path.is_dir() else "is empty"
        raise ValueError(f"{what}: calibration needs some text")
    return value


Texts = Annotated[str | list[str], AfterValidator(_check_texts)]


def read_texts(texts: str | list[str]) -> list[str]:
    """The documents: the strings of a list, a file's text, or the ``.txt``/``.md`` files of a
    folder (sorted by path, recursively); blank ones left out."""
    if isinstance(texts, list):
        return [t for t in texts if t.strip()]
    path = Path(texts).expanduser()
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if path.is_dir()
        else [path]
    )
    docs = (f.read_text(encoding="utf-8", errors="replace") for f in files)
    return [d for d in docs if d.strip()]


class TextCalibration:
    """``calibration=text``: ``max_samples`` windows of ``seq_len`` tokens (special tokens
    included) of ``texts``, tokenized with the data source's tokenizer, ``batch_size`` windows
    a batch.

    The documents are tokenized one after another and packed end to end (as Wanda's
    calibration windows are), so every window is full and no padding token reaches the
    statistics; fewer windows are made when the text runs out (one short window if it holds
    less than one).
    """

    unit = "tokens"

    def __init__(
        self,
        texts: Texts,
        max_samples: Annotated[int, Field(ge=1)] = 128,
        seq_len: Annotated[int, Field(ge=4)] = 128,
        batch_size: Annotated[int, Field(ge=1)] = 8,
    ) -> None:
        self.texts = texts
        self.max_samples = max_samples
        self.seq_len = seq_len
        self.batch_size = batch_size

    def prepare(self, bundle: Any) -> list[dict[str, torch.Tensor]]:
        tokenizer = getattr(bundle, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "calibration=text: the data source gave no tokenizer (a language model's "
                "data source sets DataBundle.tokenizer); use calibration=batches"
            )
        windows = pack_windows(tokenizer, read_texts(self.texts), self.seq_len, self.max_samples)
        if not windows:
            raise ValueError(f"calibration.texts={self.texts!r}: no tokens after tokenizing")
        batches = []
        for start in range(0, len(windows), self.batch_size):
            ids = torch.tensor(windows[start : start + self.batch_size], dtype=torch.long)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        return batches

    @staticmethod
    def count(batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())


def _with_special(tokenizer: Any, ids: list[int]) -> list[int]:
    build = getattr(tokenizer, "build_inputs_with_special_tokens", None)
    return list(build(ids)) if build is not None else list(ids)


def pack_windows(
    tokenizer: Any, docs: list[str], seq_len: int, max_samples: int
) -> list[list[int]]:
    """Up to ``max_samples`` windows of exactly ``seq_len`` ids: documents' tokens end to end,
    cut into pieces that the tokenizer's special tokens ([CLS] ... [SEP]) complete."""
    content = seq_len - len(_with_special(tokenizer, []))
    if content < 1:
        raise ValueError(f"calibration.seq_len={seq_len}: leaves no room beside special tokens")
    needed = content * max_samples
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
        if len(stream) >= needed:
            break
    full = min(len(stream) // content, max_samples)
    if full == 0:
        return [_with_special(tokenizer, stream)] if stream else []
    return [_with_special(tokenizer, stream[i * content : (i + 1) * content]) for i in range(full)]
