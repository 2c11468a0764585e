"""sparsify_exp: data sparsifiers for tensors and embedding tables (this package, torch only),
and an experiment runner in :mod:`sparsify_exp.runner` (Hydra, MLflow), loaded only when run.
"""

from sparsify_exp.calibration import CalibrationStats, StatsCollector, collect
from sparsify_exp.errors import ConfigValueError
from sparsify_exp.masks import load_masks, save_masks
from sparsify_exp.quantize import post_training_sparse_quantize
from sparsify_exp.scheduler import (
    BaseDataScheduler,
    ConstantScheduler,
    CubicScheduler,
    LinearScheduler,
    StepScheduler,
)
from sparsify_exp.sparse_format import RemappedEmbedding, load_sparse, save_sparse
from sparsify_exp.sparsifier import (
    BaseDataSparsifier,
    CompactRows,
    DataNormSparsifier,
    FirstRowSparsifier,
    MagnitudeSparsifier,
    NMSparsifier,
    RandomSparsifier,
    RowSparsifier,
    ShardedDataNormSparsifier,
    ShardedMagnitudeSparsifier,
    ShardError,
    compact_rows,
    count_nonfinite,
    pack_mask,
    unpack_mask,
)
from sparsify_exp.sparsifier.wanda import WandaSparsifier

__all__ = [
    "BaseDataScheduler",
    "BaseDataSparsifier",
    "CalibrationStats",
    "CompactRows",
    "ConfigValueError",
    "ConstantScheduler",
    "CubicScheduler",
    "DataNormSparsifier",
    "FirstRowSparsifier",
    "LinearScheduler",
    "MagnitudeSparsifier",
    "NMSparsifier",
    "RandomSparsifier",
    "RemappedEmbedding",
    "RowSparsifier",
    "ShardError",
    "ShardedDataNormSparsifier",
    "ShardedMagnitudeSparsifier",
    "StatsCollector",
    "StepScheduler",
    "WandaSparsifier",
    "collect",
    "compact_rows",
    "count_nonfinite",
    "load_masks",
    "load_sparse",
    "pack_mask",
    "post_training_sparse_quantize",
    "save_masks",
    "save_sparse",
    "unpack_mask",
]

__version__ = "0.1.0"
