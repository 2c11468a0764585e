"""sparsify_exp: data sparsifiers for tensors and embedding tables, and an experiment runner.

Importing the package costs torch alone; the runner (Hydra, MLflow) loads only when run.
"""

from sparsify_exp.scheduler import (
    BaseDataScheduler,
    ConstantScheduler,
    CubicScheduler,
    LinearScheduler,
    StepScheduler,
)
from sparsify_exp.sparsifier import (
    BaseDataSparsifier,
    DataNormSparsifier,
    FirstRowSparsifier,
    pack_mask,
    unpack_mask,
)

__all__ = [
    "BaseDataScheduler",
    "BaseDataSparsifier",
    "ConstantScheduler",
    "CubicScheduler",
    "DataNormSparsifier",
    "FirstRowSparsifier",
    "LinearScheduler",
    "StepScheduler",
    "pack_mask",
    "unpack_mask",
]

__version__ = "0.1.0"
