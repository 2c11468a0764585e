"""Helpers shared by the evaluators."""

from __future__ import annotations

import re

import torch
from torch import nn

_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_key(*parts: str) -> str:
    """An MLflow-safe metric key (alphanumerics, ``_ - . /`` and space survive)."""
    return "/".join(_BAD_KEY_CHARS.sub("_", str(p)) for p in parts)


def weight_of(data: torch.Tensor | nn.Module) -> torch.Tensor:
    """The tensor behind a named datum: itself, or an embedding's ``.weight``."""
    if isinstance(data, torch.Tensor):
        return data
    weight = getattr(data, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    raise TypeError(f"no tensor behind data of type {type(data).__name__}")
