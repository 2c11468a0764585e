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
from sparsify_exp.sparsifier.nonfinite import count_nonfinite

__all__ = [
    "SUPPORTED_TYPES",
    "BaseDataSparsifier",
    "DataNormSparsifier",
    "DataShapeMismatchError",
    "FirstRowSparsifier",
    "UnsupportedDataTypeError",
    "count_nonfinite",
    "pack_mask",
    "unpack_mask",
]
