"""``data=tensors``: random tensors of configured names, shapes and dtype."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from sparsify_exp.runner.data import DataBundle

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def build(
    tensors: Sequence[Mapping], dtype: str = "float32", seed: int = 0, init: str = "normal"
) -> DataBundle:
    """``tensors``: ``[{name: str, shape: [int, ...]}, ...]``; values drawn with ``seed``.

    ``init``: ``normal`` (standard normal) or ``uniform`` ([0, 1)).
    """
    gen = torch.Generator().manual_seed(int(seed))
    named = {}
    for spec in tensors:
        shape = tuple(int(s) for s in spec["shape"])
        if init == "uniform":
            t = torch.rand(shape, generator=gen, dtype=torch.float32)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float32)
        named[str(spec["name"])] = t.to(DTYPES[dtype])
    return DataBundle(named_data=named, format="safetensors")
