"""The mask tensor: ``bool`` (1 byte an entry) that still takes the idioms of float masks.

torch's reference keeps fp32 masks, so code written for it does ``mask *= other`` with a
float ``other``, ``mask.mean()`` or ``1.0 - mask``; on a plain ``bool`` tensor each raises.
:class:`Mask` is a ``bool`` tensor whose in-place multiply treats any nonzero factor as
"keep", whose ``mean`` is the fraction kept and whose subtraction computes in the default
float dtype. Every other operation is plain torch (no ``__torch_function__`` override), and
pickling or saving a mask gives a plain tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["Mask", "flat_keep", "new_mask", "to_mask"]


def _as_keep(mask: torch.Tensor, other: Any) -> Any:
    if mask.dtype != torch.bool:
        return other
    if isinstance(other, torch.Tensor):
        return other if other.dtype == torch.bool else other != 0
    return bool(other)


class Mask(torch.Tensor):
    """A ``bool`` tensor; ``mask *= x`` keeps entries where ``x`` is nonzero, for any dtype."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __imul__(self, other: Any) -> Mask:
        return super().__imul__(_as_keep(self, other))

    def mul_(self, other: Any) -> Mask:  # type: ignore[override]
        return super().mul_(_as_keep(self, other))

    def mean(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if self.dtype == torch.bool and kwargs.get("dtype") is None:
            kwargs["dtype"] = torch.get_default_dtype()
        return super().mean(*args, **kwargs)

    def __sub__(self, other: Any) -> torch.Tensor:
        return self._as_float() - other

    def __rsub__(self, other: Any) -> torch.Tensor:
        return other - self._as_float()

    def _as_float(self) -> torch.Tensor:
        plain = self.as_subclass(torch.Tensor)
        return plain.to(torch.get_default_dtype()) if plain.dtype == torch.bool else plain

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict[int, Any]) -> Mask:
        return self.as_subclass(torch.Tensor).__deepcopy__(memo).as_subclass(Mask)


def new_mask(shape: torch.Size, device: torch.device) -> Mask:
    """An all-kept mask."""
    return torch.ones(shape, dtype=torch.bool, device=device).as_subclass(Mask)


def to_mask(tensor: torch.Tensor) -> Mask:
    """``tensor`` as a :class:`Mask` (nonzero = kept), without a copy when it is ``bool``."""
    if tensor.dtype != torch.bool:
        tensor = tensor != 0
    return tensor if isinstance(tensor, Mask) else tensor.as_subclass(Mask)


@contextmanager
def flat_keep(mask: torch.Tensor) -> Iterator[torch.Tensor]:
    """A flat ``bool`` tensor to write ``mask``'s keep bits into: ``mask`` itself when it is a
    contiguous ``bool`` tensor, else a buffer copied into ``mask`` on exit."""
    direct = mask.dtype == torch.bool and mask.is_contiguous()
    keep = (
        mask.view(-1) if direct else torch.empty(mask.numel(), dtype=torch.bool, device=mask.device)
    )
    yield keep
    if not direct:
        mask.copy_(keep.view(mask.shape))
