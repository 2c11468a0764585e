"""Sparse + quantized embedding tables: torch's ``post_training_sparse_quantize`` for any
sparsifier of this library, and what such a table costs to store.

Quantization is torch's per-row (per-channel, axis 0) uint8 embedding quantization
(``float_qparams_weight_only_qconfig``): each ``nn.Embedding`` / ``nn.EmbeddingBag`` becomes a
``torch.ao.nn.quantized.Embedding`` / ``EmbeddingBag`` whose packed rows hold uint8 values
plus an fp32 scale and an fp32 offset per row.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sparsify_exp.sparsifier.mask_bits import packed_nbytes

__all__ = [
    "QPARAM_BYTES_PER_ROW",
    "post_training_sparse_quantize",
    "quantize_embedding",
    "sparse_quantized_nbytes",
]

EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)

QPARAM_BYTES_PER_ROW = 8
"""A quantized row's scale and offset, fp32 each (torch's packed ``embedding_bag_byte``)."""


def quantize_embedding(module: nn.Module) -> nn.Module:
    """A quantized copy of an ``nn.Embedding`` / ``nn.EmbeddingBag`` (per-row uint8 with
    float qparams, exactly what torch's ``prepare`` + ``convert`` make of it); ``module`` is
    left unchanged. Hooks are carried over as ``convert`` does."""
    if type(module) not in EMBEDDING_TYPES:
        raise ValueError(
            f"can only quantize nn.Embedding or nn.EmbeddingBag, not {type(module).__name__}"
        )
    from torch.ao.quantization import float_qparams_weight_only_qconfig
    from torch.ao.quantization.quantization_mappings import (
        get_default_static_quant_module_mappings,
    )
    from torch.ao.quantization.quantize import swap_module

    had = "qconfig" in module.__dict__
    old = module.__dict__.get("qconfig")
    module.qconfig = float_qparams_weight_only_qconfig  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=r".*deprecated", category=UserWarning)
            return swap_module(module, get_default_static_quant_module_mappings(), {})
    finally:
        if had:
            module.qconfig = old  # type: ignore[assignment]
        else:
            del module.qconfig


def sparse_quantized_nbytes(numel: int, rows: int, kept: int) -> int:
    """Bytes of a ``rows``-row table of ``numel`` entries stored sparse + quantized: a 1-bit
    per entry mask of the kept entries, a uint8 per kept entry and the rows' qparams
    (:data:`QPARAM_BYTES_PER_ROW` each); or the plain quantized table (a uint8 per entry plus
    the qparams) where that is smaller (nearly dense tables)."""
    values = min(packed_nbytes(numel) + kept, numel)
    return values + rows * QPARAM_BYTES_PER_ROW


def _parent_and_attr(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = fqn.rpartition(".")
    return model.get_submodule(parent_name), attr


def _fqns(model: nn.Module) -> dict[int, str]:
    """Every submodule's first name (a shared module is converted once, under that name)."""
    out: dict[int, str] = {}
    for name, module in model.named_modules():
        if name:
            out.setdefault(id(module), name)
    return out


def _select(model: nn.Module, select_embeddings: Any) -> list[str]:
    fqns = _fqns(model)
    if select_embeddings is None:
        return [n for n, m in model.named_modules() if n and type(m) in EMBEDDING_TYPES]
    if isinstance(select_embeddings, (str, nn.Module)) or not isinstance(
        select_embeddings, Iterable
    ):
        raise TypeError(
            "select_embeddings must be a list of embedding modules (or their names in the "
            f"model), not {type(select_embeddings).__name__}"
        )
    names: list[str] = []
    for item in select_embeddings:
        if isinstance(item, str):
            try:
                module = model.get_submodule(item)
            except AttributeError:
                raise ValueError(f"select_embeddings: the model has no module {item!r}") from None
            name = item
        elif isinstance(item, nn.Module):
            module = item
            if id(item) not in fqns:
                raise ValueError(
                    f"select_embeddings: a {type(item).__name__} that is not part of the model"
                )
            name = fqns[id(item)]
        else:
            raise TypeError(
                "select_embeddings holds embedding modules or their names, "
                f"not {type(item).__name__}"
            )
        if type(module) not in EMBEDDING_TYPES:
            raise ValueError(
                f"select_embeddings: {name!r} is a {type(module).__name__}, "
                "not an nn.Embedding or nn.EmbeddingBag"
            )
        if name not in names:
            names.append(name)
    return names


def _data_names(names: list[str], sparsifier: Any) -> dict[str, str]:
    """The name each table is added under: its dotted name for this library's sparsifiers;
    for others (torch's take no dots), dots as underscores, made unique."""
    from sparsify_exp.sparsifier.base import BaseDataSparsifier

    if isinstance(sparsifier, BaseDataSparsifier):
        return {n: n for n in names}
    out: dict[str, str] = {}
    for n in names:
        candidate, i = n.replace(".", "_"), 1
        while candidate in out.values():
            candidate, i = f"{n.replace('.', '_')}_{i}", i + 1
        out[n] = candidate
    return out


def post_training_sparse_quantize(
    model: nn.Module,
    data_sparsifier_class: type,
    sparsify_first: bool = True,
    select_embeddings: list[nn.Module] | list[str] | None = None,
    **sparse_config: Any,
) -> None:
    """Sparsifies and quantizes (per-row uint8) the model's embeddings, in place, as torch's
    ``torch.ao.pruning._experimental.data_sparsifier.quantization_utils`` function does.

    Args:
        model: the model; its ``nn.Embedding`` / ``nn.EmbeddingBag`` submodules are replaced by
            ``torch.ao.nn.quantized.Embedding`` / ``EmbeddingBag``.
        data_sparsifier_class: any data sparsifier class (this library's or torch's); it is
            built as ``data_sparsifier_class(**sparse_config)``.
        sparsify_first: sparsify, squash, then quantize the sparse weights; otherwise quantize,
            sparsify the dequantized weights and requantize them with the same scales and
            offsets.
        select_embeddings: the embedding modules to process (or their dotted names in the
            model); ``None``: every embedding submodule. Anything else raises ``ValueError``
            naming it.

    The data names given to this library's sparsifiers are the modules' dotted names (torch's
    ``name.replace('.', '_')`` made ``a.b_c`` and ``a_b.c`` the same name; for torch's
    sparsifiers, which take no dots, such names get a ``_1`` suffix). Only the selected
    modules are converted: other modules that carry a ``qconfig`` are left alone. A pruned entry
    dequantizes to within half a row's scale of 0 (float qparams need not represent 0 exactly),
    as in torch.
    """
    names = _select(model, select_embeddings)
    sparsifier = data_sparsifier_class(**sparse_config)
    data_name = _data_names(names, sparsifier)
    if sparsify_first:
        for name in names:
            sparsifier.add_data(name=data_name[name], data=model.get_submodule(name))
        sparsifier.step()
        sparsifier.squash_mask()
        for name in names:
            parent, attr = _parent_and_attr(model, name)
            setattr(parent, attr, quantize_embedding(getattr(parent, attr)))
        return

    saved: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.dtype]] = {}
    for name in names:
        parent, attr = _parent_and_attr(model, name)
        quantized = quantize_embedding(getattr(parent, attr))
        setattr(parent, attr, quantized)
        qweight = quantized.weight()
        dequantized = torch.dequantize(qweight)
        sparsifier.add_data(name=data_name[name], data=dequantized)
        saved[name] = (
            dequantized,  # sparsified in place by the squash
            qweight.q_per_channel_scales(),
            qweight.q_per_channel_zero_points(),
            qweight.q_per_channel_axis(),
            qweight.dtype,
        )
    sparsifier.step()
    sparsifier.squash_mask()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*deprecated", category=UserWarning)
        for name in names:
            dequantized, scales, zero_points, axis, dtype = saved[name]
            requantized = torch.quantize_per_channel(
                dequantized, scales=scales, zero_points=zero_points, axis=axis, dtype=dtype
            )
            model.get_submodule(name).set_weight(requantized)
