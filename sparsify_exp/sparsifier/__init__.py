"""Data sparsifiers: masks owned by a sparsifier, for tensors, parameters and embeddings."""

from sparsify_exp.sparsifier.base import (
    SUPPORTED_TYPES,
    BaseDataSparsifier,
    DataShapeMismatchError,
    UnsupportedDataTypeError,
)
from sparsify_exp.sparsifier.data_norm import DataNormSparsifier
from sparsify_exp.sparsifier.first_row import FirstRowSparsifier
from sparsify_exp.sparsifier.mask_bits import pack_mask, unpack_mask

__all__ = [
    "SUPPORTED_TYPES",
    "BaseDataSparsifier",
    "DataNormSparsifier",
    "DataShapeMismatchError",
    "FirstRowSparsifier",
    "UnsupportedDataTypeError",
    "pack_mask",
    "unpack_mask",
]
