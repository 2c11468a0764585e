"""``data=embeddings``: ``nn.Embedding`` and ``nn.EmbeddingBag`` tables of configured sizes."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, validate_call
from torch import nn

from sparsify_exp.runner.data import DataBundle, NonEmpty, UniqueNames

#: Whether this source gives nn.Embedding / nn.EmbeddingBag tables (output.quantize).
EMBEDDING_TABLES = True
MODEL = False  # no nn.Module to run calibration inputs through


class TableSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: NonEmpty
    kind: Literal["embedding", "embedding_bag"] = "embedding"
    num_embeddings: Annotated[int, Field(ge=1)]
    embedding_dim: Annotated[int, Field(ge=1)]
    mode: Literal["sum", "mean", "max"] | None = None

    @field_validator("mode")
    @classmethod
    def _bag_only(cls, mode: str | None, info: ValidationInfo) -> str | None:
        if mode is not None and info.data.get("kind") == "embedding":
            raise ValueError("only an embedding_bag has a mode")
        return mode


@validate_call
def build(
    tables: Annotated[list[TableSpec], Field(min_length=1), UniqueNames], seed: int = 0
) -> DataBundle:
    """``tables``: ``[{name, kind, num_embeddings, embedding_dim, mode}, ...]``.

    The modules themselves are the named data, so evaluators can run them (``embedding_bag``).
    """
    torch.manual_seed(seed)
    named: dict[str, nn.Module] = {}
    for spec in tables:
        if spec.kind == "embedding_bag":
            module: nn.Module = nn.EmbeddingBag(
                spec.num_embeddings, spec.embedding_dim, mode=spec.mode or "sum"
            )
        else:
            module = nn.Embedding(spec.num_embeddings, spec.embedding_dim)
        named[spec.name] = module
    return DataBundle(named_data=named, format="safetensors")


def names(tables: list[dict], **_: object) -> list[str]:
    """The names :func:`build` gives, without building a table (for validation)."""
    return [str(spec["name"]) for spec in tables]
