"""``data=tensors``: random tensors of configured names, shapes and dtype."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, validate_call

from sparsify_exp.runner.data import DataBundle, NonEmpty, UniqueNames

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: Whether this source gives nn.Embedding / nn.EmbeddingBag tables (output.quantize).
EMBEDDING_TABLES = False
MODEL = False  # no nn.Module to run calibration inputs through


def _positive(shape: list[int]) -> list[int]:
    if any(s < 1 for s in shape):
        raise ValueError("every entry must be >= 1")
    return shape


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: NonEmpty
    shape: Annotated[list[int], Field(min_length=1), AfterValidator(_positive)]


@validate_call
def build(
    tensors: Annotated[list[TensorSpec], Field(min_length=1), UniqueNames],
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = "float32",
    seed: int = 0,
    init: Literal["normal", "uniform"] = "normal",
) -> DataBundle:
    """``tensors``: ``[{name, shape}, ...]``, drawn with ``seed`` from a standard normal
    (``init=normal``) or uniform in [0, 1) (``init=uniform``)."""
    gen = torch.Generator().manual_seed(seed)
    draw = torch.rand if init == "uniform" else torch.randn
    named = {
        spec.name: draw(tuple(spec.shape), generator=gen, dtype=torch.float32).to(DTYPES[dtype])
        for spec in tensors
    }
    return DataBundle(named_data=named, format="safetensors")


def names(tensors: list[dict], **_: object) -> list[str]:
    """The names :func:`build` gives, without drawing any data (for validation)."""
    return [str(spec["name"]) for spec in tensors]
