"""Data sparsifiers: masks owned by a sparsifier, for tensors, parameters and embeddings."""

from sparsify_exp.sparsifier.base import (
    SUPPORTED_TYPES,
    BaseDataSparsifier,
    DataShapeMismatchError,
    UnsupportedDataTypeError,
)
from sparsify_exp.sparsifier.data_norm import DataNormSparsifier
from sparsify_exp.sparsifier.first_row import FirstRowSparsifier
from sparsify_exp.sparsifier.magnitude import MagnitudeSparsifier
from sparsify_exp.sparsifier.mask_bits import pack_mask, unpack_mask
from sparsify_exp.sparsifier.nm import NMSparsifier
from sparsify_exp.sparsifier.nonfinite import count_nonfinite
from sparsify_exp.sparsifier.random_mask import RandomSparsifier
from sparsify_exp.sparsifier.row import CompactRows, RowSparsifier, compact_rows
from sparsify_exp.sparsifier.sharded import (
    ShardedDataNormSparsifier,
    ShardedMagnitudeSparsifier,
    ShardError,
)
from sparsify_exp.sparsifier.wanda import WandaSparsifier

__all__ = [
    "SUPPORTED_TYPES",
    "BaseDataSparsifier",
    "CompactRows",
    "DataNormSparsifier",
    "DataShapeMismatchError",
    "FirstRowSparsifier",
    "MagnitudeSparsifier",
    "NMSparsifier",
    "RandomSparsifier",
    "RowSparsifier",
    "ShardError",
    "ShardedDataNormSparsifier",
    "ShardedMagnitudeSparsifier",
    "UnsupportedDataTypeError",
    "WandaSparsifier",
    "compact_rows",
    "count_nonfinite",
    "pack_mask",
    "unpack_mask",
]
