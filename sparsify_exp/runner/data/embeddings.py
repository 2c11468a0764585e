"""``data=embeddings``: ``nn.Embedding`` and ``nn.EmbeddingBag`` tables of configured sizes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sparsify_exp.runner.data import DataBundle


def build(tables: Sequence[Mapping], seed: int = 0) -> DataBundle:
    """``tables``: ``[{name, num_embeddings, embedding_dim, kind, mode}, ...]``.

    ``kind`` is ``embedding`` or ``embedding_bag`` (``mode``: sum | mean | max). The modules
    themselves are the named data, so evaluators can run them (``embedding_bag``).
    """
    torch.manual_seed(int(seed))
    named: dict[str, nn.Module] = {}
    for spec in tables:
        num, dim = int(spec["num_embeddings"]), int(spec["embedding_dim"])
        if spec.get("kind", "embedding") == "embedding_bag":
            module: nn.Module = nn.EmbeddingBag(num, dim, mode=spec.get("mode") or "sum")
        else:
            module = nn.Embedding(num, dim)
        named[str(spec["name"])] = module
    return DataBundle(named_data=named, format="safetensors")
