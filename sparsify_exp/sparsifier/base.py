"""BaseDataSparsifier: owns the masks of named data (tensors, parameters, embedding tables).

The API matches ``torch.ao.pruning._experimental.data_sparsifier.BaseDataSparsifier`` so that
switching is a one-line import change. Differences are all fixes:

* any name works, dots included (``encoder.layer.0.weight``);
* masks are ``bool`` (1 byte an entry, not 4) on the data's own device, for data of any shape;
* ``squash_mask`` multiplies the user's tensor in place (no second copy of the data);
* ``state_dict()`` stores masks at 1 bit an entry and loads with ``torch.load(weights_only=True)``;
* pickling and ``copy.deepcopy`` keep every attribute, so the copy still steps.

Data too large for memory (a memory-mapped checkpoint) is added with a
:class:`~sparsify_exp.sparsifier.packed_mask.PackedMask` as its initial ``mask``: the mask
stays at 1 bit an entry, :meth:`~BaseDataSparsifier.step` calls
:meth:`~BaseDataSparsifier.update_packed_mask`, and the data is never written to (see
:mod:`sparsify_exp.streaming`).
"""

from __future__ import annotations

import abc
import copy
import keyword
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsify_exp.sparsifier.mask import new_mask, to_mask
from sparsify_exp.sparsifier.mask_bits import pack_mask, unpack_mask
from sparsify_exp.sparsifier.packed_mask import PackedMask

__all__ = [
    "SUPPORTED_TYPES",
    "BaseDataSparsifier",
    "DataShapeMismatchError",
    "UnsupportedDataTypeError",
]

EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
SUPPORTED_TYPES = (torch.Tensor, nn.Parameter, *EMBEDDING_TYPES)

# top-level state_dict keys, and the keys of parametrized data, as torch's reference writes them
_STATE, _DATA_GROUPS, _CONTAINER = "state", "data_groups", "_container"
_PARAMETRIZED_PREFIX = "parametrizations."
_PARAMETRIZED_SUFFIX = ".original"
# attribute names torch's parametrize machinery adds to the container
_RESERVED_KEYS = frozenset({"parametrizations"})


class UnsupportedDataTypeError(TypeError, AssertionError):
    """Data of a type the sparsifier cannot hold (also an ``AssertionError``, as in torch)."""


class DataShapeMismatchError(ValueError, AssertionError):
    """Re-added data whose shape differs from the mask being reused."""


class _Container(nn.Module):
    """Holds every data as a parametrized buffer, so masks belong to the sparsifier."""


class _MaskParametrization(nn.Module):
    """``x -> x * mask``. The mask is a non-persistent buffer: checkpoints pack it themselves."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask.shape != x.shape:
            raise RuntimeError(
                f"mask shape {tuple(mask.shape)} no longer matches data shape "
                f"{tuple(x.shape)}; a mask must keep its data's shape"
            )
        # `where` allocates only the result; `x * mask` would first cast the mask to x's dtype
        return torch.where(mask, x, 0) if mask.dtype == torch.bool else x * mask


def _apply_mask_(data: torch.Tensor, mask: torch.Tensor) -> None:
    """``data`` becomes what the masked view shows, in place and without a temporary."""
    if mask.dtype == torch.bool:
        torch.where(mask, data, data.new_zeros(()), out=data)
    else:
        data.mul_(mask)


def _extract_weight(data: Any) -> torch.Tensor:
    if isinstance(data, EMBEDDING_TYPES):
        return data.weight
    if isinstance(data, torch.Tensor):
        if data.layout != torch.strided:
            raise UnsupportedDataTypeError(
                f"data must be a dense (strided) tensor; got layout {data.layout}. "
                "Call .to_dense() first."
            )
        return data
    hint = ""
    if isinstance(data, nn.Module):
        hint = (
            " To sparsify a module's weights, add each of its parameters, e.g. "
            "`for n, p in model.named_parameters(): sp.add_data(n, p)`."
        )
    raise UnsupportedDataTypeError(
        f"data of type {type(data).__name__} is not supported; expected torch.Tensor, "
        f"nn.Parameter, nn.Embedding or nn.EmbeddingBag.{hint}"
    )


class BaseDataSparsifier(abc.ABC):
    r"""Base class of data sparsifiers: subclasses implement only :meth:`update_mask`.

    Args:
        data_list: ``(name, data)`` pairs to add with the default config.
        **defaults: config every name gets unless its ``add_data`` call overrides a key.

    Example::

        >>> class FirstRow(BaseDataSparsifier):
        ...     def update_mask(self, name, data, **config):
        ...         self.get_mask(name)[0] = 0
        >>> sp = FirstRow(sparsity_level=0.5)
        >>> sp.add_data("emb", nn.EmbeddingBag(10, 4))
        >>> sp.step(); sp.squash_mask()
    """

    #: statistics of calibration data each name needs in its ``add_data`` config (keys of
    #: :data:`sparsify_exp.calibration.NEEDS`); a runner collects them before the first step
    calibration_needs: tuple[str, ...] = ()

    def __init__(self, data_list: Iterable[tuple[str, Any]] | None = None, **defaults: Any):
        self.defaults: dict[str, Any] = defaults
        self.state: dict[str, dict[str, Any]] = defaultdict(dict)
        self.data_groups: dict[str, dict[str, Any]] = {}
        self.enable_mask_update = True
        self._container = _Container()
        self._keys: dict[str, str] = {}  # data name -> attribute name in the container
        self._live: dict[str, torch.Tensor] = {}  # data name -> data, while not squashed
        if data_list is not None:
            for name, data in data_list:
                self.add_data(name, data)

    # ------------------------------------------------------------------ to override
    @abc.abstractmethod
    def update_mask(self, name: str, data: torch.Tensor, **config: Any) -> None:
        """Changes ``self.get_mask(name)`` in place for the (unmasked) ``data``."""

    def validate_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        """Checks (and may normalise) a name's merged config; raise ``ValueError`` if bad."""
        return config

    def update_packed_mask(
        self, name: str, data: torch.Tensor, mask: PackedMask, **config: Any
    ) -> None:
        """:meth:`update_mask` for a mask held packed (memory-mapped data).

        This default unpacks the mask, calls :meth:`update_mask` and packs the result back,
        so any sparsifier steps on such data, with a byte an entry while it runs. Sparsifiers
        that can write their mask a range at a time override it and stay at 1 bit an entry.
        """
        state = self.state[name]
        state["mask"] = to_mask(mask.unpack())
        try:
            self.update_mask(name, data, **config)
            mask.write(0, state["mask"].reshape(-1))
        finally:
            state["mask"] = mask

    # ------------------------------------------------------------------ data
    def add_data(self, name: str, data: Any, reuse_mask: bool = True, **config: Any) -> Any:
        r"""Registers ``data`` under ``name`` by reference, with ``config`` over the defaults.

        Re-adding a name warns, keeps the old config updated with ``config`` and, with
        ``reuse_mask=True``, keeps the old mask (the new data must have the same shape).
        A ``mask`` key in ``config`` gives the initial mask (any dtype; nonzero = kept); a
        :class:`PackedMask` is held as it is, packed, and the data is never written to
        (:meth:`squash_mask` can then only leave it as it is).
        Returns the registered tensor: the user's own (for an embedding, its ``weight``).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string; got {name!r}")
        weight = _extract_weight(data)
        initial_mask = config.pop("mask", None)

        replacing = name in self.data_groups
        if replacing:
            warnings.warn(
                f"Replacing existing data {name!r}. - Did you mean a different name?",
                stacklevel=2,
            )
            local_args = {**self.data_groups[name], **config}
        else:
            local_args = {**copy.deepcopy(self.defaults), **config}
        # everything is checked before the old entry is touched: a bad call changes nothing
        local_args = self.validate_config(name, local_args)
        if isinstance(initial_mask, PackedMask):
            if initial_mask.shape != weight.shape:
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(initial_mask.shape)}; it must match "
                    f"the data's shape {tuple(weight.shape)}"
                )
            mask = initial_mask
        elif initial_mask is not None:
            mask = self._as_mask(name, initial_mask, weight)
        elif replacing and reuse_mask:
            mask = self.get_mask(name)
            if isinstance(mask, PackedMask):
                mask = to_mask(mask.unpack())
            if mask.shape != weight.shape:
                raise DataShapeMismatchError(
                    f"cannot reuse the mask of {name!r}: it has shape "
                    f"{tuple(mask.shape)} but the new data has shape "
                    f"{tuple(weight.shape)}; pass reuse_mask=False to start a new mask"
                )
            if mask.device != weight.device:
                mask = to_mask(mask.to(weight.device))
        else:
            mask = new_mask(weight.shape, weight.device)
        if replacing:
            self._remove(name)

        key = self._key_for(name)
        self._register(key, weight, mask)
        self._keys[name] = key
        self._live[name] = weight
        self.state[name]["mask"] = mask
        self.data_groups[name] = local_args
        return weight

    def get_data(self, name: str, return_original: bool = True) -> torch.Tensor:
        """The data itself (``return_original=True``) or its masked view (``False``)."""
        key = self._key(name)
        if return_original:
            if name not in self._live:
                raise ValueError(
                    f"the mask of {name!r} was squashed, so its original data is gone; "
                    "use get_data(name, return_original=False) for the squashed data"
                )
            return self._live[name]
        if name in self._live and self.is_packed(name):
            raise ValueError(
                f"the mask of {name!r} is held packed (memory-mapped data): there is no masked "
                "copy in memory; write one with sparsify_exp.streaming.write_squashed"
            )
        return getattr(self._container, key)

    def get_mask(self, name: str) -> torch.Tensor | PackedMask:
        """The mask of ``name``: change it in place to change what is kept (a
        :class:`PackedMask` for data added with one)."""
        if name not in self.state or "mask" not in self.state[name]:
            raise ValueError(self._unknown_name_message(name))
        return self.state[name]["mask"]

    def is_squashed(self, name: str) -> bool:
        self._key(name)
        return name not in self._live

    def is_packed(self, name: str) -> bool:
        """Whether the mask of ``name`` is held packed, at 1 bit an entry."""
        return isinstance(self.get_mask(name), PackedMask)

    # ------------------------------------------------------------------ stepping
    def step(self) -> None:
        """Calls ``update_mask(name, data, **config)`` for every name not yet squashed."""
        if not self.enable_mask_update:
            return
        live = self._live
        with torch.no_grad():
            for name, config in self.data_groups.items():
                data = live.get(name)
                if data is not None:
                    self._update(name, data, config)

    def _update(self, name: str, data: torch.Tensor, config: dict[str, Any]) -> None:
        """``update_mask``, or ``update_packed_mask`` for a mask held packed."""
        mask = self.state[name]["mask"]
        if isinstance(mask, PackedMask):
            self.update_packed_mask(name, data, mask, **config)
        else:
            self.update_mask(name, data, **config)

    def squash_mask(
        self,
        *args: Any,
        leave_parametrized: bool = True,
        names: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Removes the parametrization of ``names`` (default: all).

        With ``leave_parametrized=True`` the mask is multiplied into the user's own tensor in
        place; with ``False`` the data is left as it was. Squashed names are skipped by
        :meth:`step`; their masks stay readable with :meth:`get_mask`. Data whose mask is
        held packed is never written to: it takes ``leave_parametrized=False`` (write its
        masked form with :func:`sparsify_exp.streaming.write_squashed`).
        """
        names = list(self.data_groups) if names is None else list(names)
        for name in names:
            self._key(name)  # a clear error for an unknown name before anything changes
        packed = [n for n in names if n in self._live and self.is_packed(n)]
        if leave_parametrized and packed:
            raise ValueError(
                f"the mask of {packed[0]!r} is held packed (memory-mapped data, never written "
                "to): squash_mask(leave_parametrized=False) forgets it, and "
                "sparsify_exp.streaming.write_squashed writes the masked data to a new file"
            )
        for name in names:
            original = self._live.pop(name, None)
            if original is None:
                continue
            if leave_parametrized:
                with torch.no_grad():
                    _apply_mask_(original, self.get_mask(name).to(original.device))
            if parametrize.is_parametrized(self._container, self._keys[name]):
                parametrize.remove_parametrizations(
                    self._container, self._keys[name], leave_parametrized=False
                )

    def _extract_weight(self, data: Any) -> torch.Tensor:
        """The tensor a data stands for (an embedding's ``weight``), as torch's reference has it."""
        return _extract_weight(data)

    def _delete_data(self, name: str) -> None:
        """Forgets ``name`` without applying its mask (torch's reference name for it)."""
        self._key(name)
        self._remove(name)

    def prepare(self, model: Any, config: Any) -> None:
        raise NotImplementedError("a data sparsifier has no model to prepare; use add_data")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"state", "data_groups", "_container"}`` with masks packed to 1 bit an entry.

        ``_container`` holds the data under ``parametrizations.<name>.original`` (or ``<name>``
        once squashed), as torch's reference does; names may contain dots.
        """
        return {
            _STATE: self._packed_state(),
            _DATA_GROUPS: copy.deepcopy(self.data_groups),
            _CONTAINER: self._container_data(),
        }

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restores data, masks and configs.

        ``strict=True`` replaces everything this sparsifier held; ``strict=False`` keeps the
        names the state_dict does not mention. Accepts the masks as packed bits, dense
        tensors or sparse COO tensors (torch's reference format; its masks of 1-D data are
        ``(1, N)`` and are reshaped to the data's shape).

        Everything is checked before anything changes, so a bad checkpoint fails here, with
        one ``ValueError`` naming each bad key, and leaves the sparsifier as it was, instead
        of failing later in ``step()`` or ``squash_mask()``: every name needs a config, a
        state and a tensor in ``_container``; every mask must match its data's shape; every
        ``_container`` key must belong to a name; configs must pass ``validate_config``.
        """
        entries = self._check_state_dict(state_dict)
        if strict:
            self._reset()
        for name, entry in entries.items():
            if name in self.data_groups:
                self._remove(name)
            self._restore(name, entry)

    def __getstate__(self) -> dict[str, Any]:
        state = {
            key: value
            for key, value in self.__dict__.items()
            if key not in ("_container", "_keys", "_live", "state")
            # the counter a scheduler wraps around `step` is a closure: it cannot be pickled
            and not (key == "step" and getattr(value, "_with_counter", False))
        }
        state["state"] = self._packed_state()
        state["_container"] = self._container_data()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        states = state.pop("state")
        container = state.pop("_container")
        data_groups = state.pop("data_groups")
        self.__dict__.update(state)
        self._reset()
        entries = self._check_state_dict(
            {_STATE: states, _DATA_GROUPS: data_groups, _CONTAINER: container}
        )
        for name, entry in entries.items():
            self._restore(name, entry)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for name, config in self.data_groups.items():
            lines.append("\tData Group")
            lines.append(f"\t    name: {name}")
            lines.extend(f"\t    {key}: {config[key]}" for key in sorted(config))
        lines.append(")")
        return "\n".join(lines)

    # ------------------------------------------------------------------ internals
    def _unknown_name_message(self, name: str) -> str:
        known = list(self.data_groups)
        shown = ", ".join(repr(n) for n in known[:10]) + (" ..." if len(known) > 10 else "")
        return f"no data named {name!r} in this sparsifier; known names: [{shown}]"

    def _key(self, name: str) -> str:
        try:
            return self._keys[name]
        except (KeyError, TypeError):
            raise ValueError(self._unknown_name_message(name)) from None

    def _key_for(self, name: str) -> str:
        """An attribute name for ``name`` in the container: the name itself when it can be."""
        if name in self._keys:
            return self._keys[name]
        if (
            name.isidentifier()
            and not keyword.iskeyword(name)
            and not name.startswith("_")
            and name not in _RESERVED_KEYS
            and not self._attribute_taken(name)
        ):
            return name
        base = "_data_" + re.sub(r"\W", "_", name)
        key, suffix = base, 0
        while self._attribute_taken(key):
            suffix += 1
            key = f"{base}_{suffix}"
        return key

    def _attribute_taken(self, key: str) -> bool:
        # never hasattr(container, key): on a parametrized key it would compute the masked data
        container = self._container
        return (
            hasattr(type(container), key)
            or key in container.__dict__
            or key in container._buffers
            or key in container._parameters
            or key in container._modules
        )

    def _as_mask(self, name: str, mask: Any, weight: torch.Tensor) -> torch.Tensor:
        mask = torch.as_tensor(mask, device=weight.device)
        if mask.shape != weight.shape:
            raise ValueError(
                f"mask for {name!r} has shape {tuple(mask.shape)}; it must match the data's "
                f"shape {tuple(weight.shape)}"
            )
        return to_mask(mask)

    def _register(
        self, key: str, weight: torch.Tensor, mask: torch.Tensor | PackedMask | None
    ) -> None:
        self._container.register_buffer(key, weight)
        if mask is not None and not isinstance(mask, PackedMask):
            parametrize.register_parametrization(
                self._container, key, _MaskParametrization(mask), unsafe=True
            )

    def _remove(self, name: str) -> None:
        """Forgets ``name`` without touching its data."""
        key = self._keys.pop(name)
        self._live.pop(name, None)
        if parametrize.is_parametrized(self._container, key):
            parametrize.remove_parametrizations(self._container, key, leave_parametrized=False)
        delattr(self._container, key)
        self.state.pop(name, None)
        self.data_groups.pop(name, None)

    def _reset(self) -> None:
        self._container = _Container()
        self._keys = {}
        self._live = {}
        self.state = defaultdict(dict)
        self.data_groups = {}

    def _packed_state(self) -> dict[str, dict[str, Any]]:
        packed = {}
        for name, entry in self.state.items():
            entry = dict(entry)
            mask = entry.get("mask")
            if isinstance(mask, PackedMask):
                entry["mask"] = mask.bits.clone()
                entry["mask_shape"] = tuple(mask.shape)
            elif isinstance(mask, torch.Tensor):
                entry["mask"] = pack_mask(mask)
                entry["mask_shape"] = tuple(mask.shape)
            packed[name] = entry
        return packed

    def _container_data(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, key in self._keys.items():
            if name in self._live:
                tensor = self._live[name]
                out[_parametrized_key(name)] = tensor.detach()
            else:
                out[name] = getattr(self._container, key).detach()
        return out

    def _check_state_dict(self, state_dict: Any) -> dict[str, _Entry]:
        """Every name's data, mask, state and config, checked, converted and ready to apply
        (``self`` untouched); raises one ``ValueError`` listing every problem, by key."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a dict; got {type(state_dict).__name__}")
        missing = [k for k in (_STATE, _DATA_GROUPS, _CONTAINER) if k not in state_dict]
        if missing:
            raise ValueError(
                f"state_dict is missing {missing}; expected the keys 'state', "
                "'data_groups' and '_container' written by state_dict()"
            )
        for key in (_STATE, _DATA_GROUPS, _CONTAINER):
            if not isinstance(state_dict[key], Mapping):
                raise ValueError(
                    f"state_dict[{key!r}]: must be a dict keyed by data name; "
                    f"got {type(state_dict[key]).__name__}"
                )
        states = state_dict[_STATE]
        data_groups = state_dict[_DATA_GROUPS]
        container = state_dict[_CONTAINER]

        problems: list[str] = []
        entries: dict[str, _Entry] = {}
        for name, state in states.items():
            entry = self._check_entry(name, state, data_groups, container, problems)
            if entry is not None:
                entries[name] = entry
        problems.extend(
            f"state_dict['data_groups'][{name!r}]: has no state in state_dict['state']"
            for name in data_groups
            if name not in states
        )
        owned = {key for name in states for key in (name, _parametrized_key(name))}
        problems.extend(
            f"state_dict['_container'][{key!r}]: belongs to no data name in state_dict['state']"
            for key in container
            if key not in owned
        )
        if problems:
            if len(problems) == 1:
                raise ValueError(problems[0])
            raise ValueError(
                f"cannot load state_dict, {len(problems)} problems: " + "; ".join(problems)
            )
        return entries

    def _check_entry(
        self,
        name: Any,
        state: Any,
        data_groups: Mapping[str, Any],
        container: Mapping[str, Any],
        problems: list[str],
    ) -> _Entry | None:
        """One name's entry, or ``None`` with the reasons appended to ``problems``."""
        where = f"state_dict['state'][{name!r}]"
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: a data name must be a non-empty string")
            return None
        if not isinstance(state, Mapping):
            problems.append(f"{where}: must be a dict (with a 'mask'); got {type(state).__name__}")
            return None
        count = len(problems)

        config = data_groups.get(name)
        if config is None:
            problems.append(f"{where}: {name!r} has no entry in state_dict['data_groups']")
        elif not isinstance(config, Mapping):
            problems.append(
                f"state_dict['data_groups'][{name!r}]: must be a dict; got {type(config).__name__}"
            )
        else:
            try:
                config = self.validate_config(name, copy.deepcopy(dict(config)))
            except (ValueError, TypeError) as error:
                problems.append(f"state_dict['data_groups'][{name!r}]: {error}")

        parametrized = _parametrized_key(name) in container
        key = _parametrized_key(name) if parametrized else name
        data = container.get(key)
        if data is None:
            problems.append(
                f"state_dict['_container']: no data for {name!r} (expected the key "
                f"{_parametrized_key(name)!r} or, once squashed, {name!r})"
            )
            return None
        if not isinstance(data, torch.Tensor) or data.layout != torch.strided:
            what = type(data).__name__ if not isinstance(data, torch.Tensor) else data.layout
            problems.append(
                f"state_dict['_container'][{key!r}]: must be a dense tensor; got {what}"
            )
            return None

        mask = _checked_mask(name, state, data, problems)
        if len(problems) > count:
            return None
        rest = {k: copy.deepcopy(v) for k, v in state.items() if k not in ("mask", "mask_shape")}
        return _Entry(data, mask, parametrized, rest, config)

    def _restore(self, name: str, entry: _Entry) -> None:
        key = self._key_for(name)
        self._register(key, entry.data, entry.mask if entry.parametrized else None)
        self._keys[name] = key
        if entry.parametrized:
            self._live[name] = entry.data
        self.state[name] = {**entry.state, "mask": entry.mask}
        self.data_groups[name] = entry.config


class _Entry(NamedTuple):
    """A checked state_dict entry: what :meth:`BaseDataSparsifier._restore` registers."""

    data: torch.Tensor
    mask: torch.Tensor
    parametrized: bool
    state: dict[str, Any]
    config: dict[str, Any]


def _parametrized_key(name: str) -> str:
    return f"{_PARAMETRIZED_PREFIX}{name}{_PARAMETRIZED_SUFFIX}"


def _shape_text(shape: Iterable[int]) -> str:
    return str(tuple(int(size) for size in shape))


def _squeezed(shape: Iterable[int]) -> tuple[int, ...]:
    """``shape`` without its size-1 dims: torch's reference masks differ from data only so."""
    return tuple(int(size) for size in shape if size != 1)


def _checked_mask(
    name: str, state: Mapping[str, Any], data: torch.Tensor, problems: list[str]
) -> torch.Tensor | None:
    """The ``bool`` mask of ``state`` on the data's device (a new tensor, never the
    state_dict's), or ``None`` with the reasons appended to ``problems``."""
    where = f"state_dict['state'][{name!r}]['mask']"
    mask = state.get("mask")
    shape = state.get("mask_shape")
    if mask is None:
        return new_mask(data.shape, data.device)
    if not isinstance(mask, torch.Tensor):
        problems.append(f"{where}: must be a tensor; got {type(mask).__name__}")
        return None
    mismatch = f"does not match data {name!r} of shape {_shape_text(data.shape)}"
    if shape is not None:  # packed bits, as state_dict() writes them
        if not isinstance(shape, Sequence) or not all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape
        ):
            problems.append(
                f"state_dict['state'][{name!r}]['mask_shape']: must be a tuple of sizes; "
                f"got {shape!r}"
            )
            return None
        if tuple(shape) != tuple(data.shape):
            problems.append(f"{where}: shape {_shape_text(shape)} {mismatch}")
            return None
        try:
            return to_mask(unpack_mask(mask, shape, device=data.device))
        except ValueError as error:
            problems.append(f"{where}: {error}")
            return None
    if mask.dtype.is_complex:
        problems.append(f"{where}: dtype {mask.dtype} is not a mask dtype (bool, int or float)")
        return None
    if tuple(mask.shape) != tuple(data.shape) and _squeezed(mask.shape) != _squeezed(data.shape):
        problems.append(f"{where}: shape {_shape_text(mask.shape)} {mismatch}")
        return None
    mask = mask.to_dense() if mask.layout != torch.strided else mask
    # `!= 0` makes a new bool tensor: the loaded mask never aliases the state_dict's
    keep = mask.to(data.device) != 0
    return to_mask(keep.reshape(data.shape))
