"""``data=model``: the parameters of an ``nn.Module`` built from ``module._target_``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsify_exp.runner.data import DataBundle, select_names

MODEL = True  # calibration runs its inputs through the module


def build(
    module: Any,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    seed: int = 0,
) -> DataBundle:
    """Select ``module.named_parameters()`` by glob patterns (``net.*.weight``).

    ``module`` is an ``nn.Module`` or a config with ``_target_`` (the shipped YAML sets
    ``_recursive_: false`` so the module is built here, after seeding with ``seed``).
    """
    torch.manual_seed(seed)
    if not isinstance(module, nn.Module):
        from hydra.utils import instantiate

        module = instantiate(module, _convert_="all")
    if not isinstance(module, nn.Module):
        raise TypeError(f"data.module must build an nn.Module, got {type(module).__name__}")
    params = dict(module.named_parameters())
    names = select_names(params, include, exclude)
    if not names:
        raise ValueError(
            f"data.include={list(include or [])} / data.exclude={list(exclude or [])} select "
            f"no parameter (available: {', '.join(list(params)[:20])})"
        )
    return DataBundle(named_data={n: params[n] for n in names}, model=module)
