"""RandomSparsifier: removes exactly ``round(level * numel)`` entries chosen at random."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from sparsify_exp.errors import ConfigValueError
from sparsify_exp.sparsifier.base import BaseDataSparsifier
from sparsify_exp.sparsifier.block_ops import CHUNK_ELEMENTS
from sparsify_exp.sparsifier.checks import check_level, checked_config
from sparsify_exp.sparsifier.mask import flat_keep
from sparsify_exp.sparsifier.packed_mask import PackedMask
from sparsify_exp.sparsifier.packed_select import select_packed
from sparsify_exp.sparsifier.scope import check_scope
from sparsify_exp.sparsifier.select import KeySource, select_and_write

__all__ = ["RandomSparsifier", "random_keys"]

_KEY_BITS = 31
_TOP = (1 << _KEY_BITS) - 1
_M32 = (1 << 32) - 1
# lowbias32 (Wellons' hash-prospector): a bijection of 32-bit words with low bias
_MIX = ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None))
_GOLDEN = 0x9E3779B9


def _signed32(value: int) -> int:
    value &= _M32
    return value - (1 << 32) if value >= 1 << 31 else value


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in ``[0, 2**32)`` as the int32 words of the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).int()


def _check_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ConfigValueError("seed", value, "must be an integer in [0, 2**64)")
    return int(value)


def name_salt(seed: int, name: str) -> tuple[int, int]:
    """Two 32-bit words from ``seed`` and ``name``: the same in every process and Python
    (BLAKE2b, not the salted ``hash``)."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mix_(h: torch.Tensor, scratch: torch.Tensor) -> None:
    """``h = lowbias32(h)`` in place, on int32 words (products wrap modulo 2**32)."""
    for shift, multiplier in _MIX:
        torch.bitwise_right_shift(h, shift, out=scratch)
        scratch.bitwise_and_((1 << (32 - shift)) - 1)  # the shift is logical, not arithmetic
        h.bitwise_xor_(scratch)
        if multiplier is not None:
            h.mul_(_signed32(multiplier))


def random_keys(
    positions_low: torch.Tensor,
    high: int | torch.Tensor,
    salt: tuple[int, int],
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """31-bit keys of flat positions ``high * 2**32 + positions_low`` (``positions_low``:
    int32, the position modulo 2**32 as a signed word; consumed): a pure function of the
    position and the salt, so every chunking, layout and device gives the same keys.
    ``scratch``: an int32 tensor like ``positions_low`` to work in."""
    h = positions_low
    scratch = torch.empty_like(h) if scratch is None else scratch
    h.add_(_signed32(salt[0]))
    _mix_(h, scratch)
    if isinstance(high, torch.Tensor):
        h.bitwise_xor_(_as_int32((high * _GOLDEN + salt[1]).bitwise_and_(_M32)))
    else:
        h.bitwise_xor_(_signed32(high * _GOLDEN + salt[1]))
    _mix_(h, scratch)
    return h.bitwise_and_(_TOP)


class RandomKeys(KeySource):
    """The random keys of ``numel`` positions."""

    def __init__(self, numel: int, salt: tuple[int, int], device: torch.device) -> None:
        self.numel = numel
        self.salt = salt
        self.key_dtype = torch.int32
        self.device = device

    def keys_at(self, positions: torch.Tensor) -> torch.Tensor:
        return random_keys(_as_int32(positions.bitwise_and(_M32)), positions >> 32, self.salt)

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        # CHUNK_ELEMENTS divides 2**32: a chunk never straddles a change of the high word
        base = torch.arange(min(CHUNK_ELEMENTS, self.numel), dtype=torch.int32, device=self.device)
        buffer, scratch = torch.empty_like(base), torch.empty_like(base)
        for start in range(0, self.numel, CHUNK_ELEMENTS):
            count = min(CHUNK_ELEMENTS, self.numel - start)
            keys = torch.add(base[:count], _signed32(start), out=buffer[:count])
            yield start, random_keys(keys, start >> 32, self.salt, scratch[:count])


def _bracket(numel: int, k: int) -> tuple[int, int]:
    """Key range that holds the k-th smallest of ``numel`` uniform keys but with odds of
    about 1e-15 (8 standard deviations); outside it, the exact fallback runs."""
    p = k / numel
    margin = 8.0 * math.sqrt(p * (1.0 - p) / numel) + 2.0 / numel
    low = max(0, math.floor((p - margin) * (_TOP + 1)))
    high = min(_TOP, math.ceil((p + margin) * (_TOP + 1)))
    return low, high


class RandomSparsifier(BaseDataSparsifier):
    r"""Zeroes exactly ``round(sparsity_level * numel)`` entries of each data, chosen at random.

    * ``sparsity_level``: fraction of entries removed, in ``[0, 1]``.
    * ``seed``: an integer in ``[0, 2**64)``; the same seed gives the same masks.

    Both are defaults that ``add_data(name, data, **config)`` may override per name. The data's
    values play no part (NaN and inf included): a mask baseline for the other sparsifiers.

    Each entry gets a 31-bit key, a hash of its row-major position and of a salt that
    BLAKE2b derives from the seed and the name; the ``k`` lowest keys are removed (equal keys,
    rare, by position). The mask is therefore a function of ``(seed, name, shape)`` alone:
    the same in every process, on every device, for every layout of the data, and stepping
    again gives it again; two names with one seed get unrelated masks. A step generates the
    keys in chunks, with one pass in all but pathological cases: no full-size temporary.
    ``scope="global"`` is not supported (a :class:`ConfigValueError`).
    """

    def __init__(
        self,
        data_list: Iterable[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        seed: int = 0,
        scope: str = "local",
    ) -> None:
        check_level(sparsity_level)
        _check_seed(seed)
        self.scope = check_scope(scope, type(self).__name__, has_global=False)
        super().__init__(data_list=data_list, sparsity_level=sparsity_level, seed=seed)

    def validate_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        return checked_config(name, config, {"sparsity_level": check_level, "seed": _check_seed})

    def update_mask(  # type: ignore[override]
        self, name: str, data: torch.Tensor, sparsity_level: float, seed: int, **kwargs: Any
    ) -> None:
        level = check_level(sparsity_level)
        salt = name_salt(_check_seed(seed), name)
        mask = self.get_mask(name)
        n = mask.numel()
        k = round(level * n)
        with flat_keep(mask) as keep:
            bracket = _bracket(n, k) if n else None
            select_and_write(RandomKeys(n, salt, mask.device), k, keep, bracket)

    def update_packed_mask(  # type: ignore[override]
        self,
        name: str,
        data: torch.Tensor,
        mask: PackedMask,
        sparsity_level: float,
        seed: int,
        **kwargs: Any,
    ) -> None:
        """The step into a packed mask: the keys are generated and packed a chunk at a time
        (the data is not read)."""
        level = check_level(sparsity_level)
        salt = name_salt(_check_seed(seed), name)
        n = mask.numel()
        k = round(level * n)
        source = RandomKeys(n, salt, mask.device)
        select_packed(source, k, mask.reshape(-1), _bracket(n, k) if n else None)
