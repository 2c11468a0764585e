"""FirstRowSparsifier: the smallest useful sparsifier, and a template for writing one."""

from __future__ import annotations

from typing import Any

import torch

from sparsify_exp.sparsifier.base import BaseDataSparsifier

__all__ = ["FirstRowSparsifier"]


class FirstRowSparsifier(BaseDataSparsifier):
    """Zeroes row 0 of every data (entry 0 of 1-D data), e.g. an embedding's padding row.

    It reads no config; ``config_keys = ()`` says so, and the runner rejects a key given to it
    (a typo, or a key meant for another sparsifier) instead of ignoring it."""

    config_keys: tuple[str, ...] = ()

    def update_mask(self, name: str, data: torch.Tensor, **config: Any) -> None:
        mask = self.get_mask(name)
        if mask.dim() > 0 and mask.shape[0] > 0:
            mask[0] = False
