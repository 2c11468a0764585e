"""Imports the runner's slow dependencies on a thread while the main thread does other work.

MLflow takes about 2 s to import and matplotlib (for the mask pictures) most of a second;
``python -m sparsify_exp`` starts both while Hydra composes, the data is built and the steps
run, so that neither import is on the critical path.
"""

from __future__ import annotations

import sys
import threading

_PREFETCH: threading.Thread | None = None
_MLFLOW_IMPORTED = threading.Event()


def _prefetch() -> None:
    try:
        import mlflow
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except Exception:  # the main thread imports again and reports any real problem
        pass
    finally:
        _MLFLOW_IMPORTED.set()
    try:  # the mask pictures need these at the end of the run
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401
    except Exception:
        pass


def start_prefetch() -> None:
    """Imports MLflow (~2 s), then matplotlib, on a thread while Hydra composes, the data is
    built and the steps run."""
    global _PREFETCH
    if _PREFETCH is None and "mlflow.tracking" not in sys.modules:
        _PREFETCH = threading.Thread(target=_prefetch, name="sparsify-prefetch", daemon=True)
        _PREFETCH.start()


def mlflow_ready() -> None:
    """Waits for MLflow's import: two threads importing it at once break its circular imports."""
    if _PREFETCH is not None:
        _MLFLOW_IMPORTED.wait()


def prefetch_done() -> None:
    """Waits for the whole prefetch (matplotlib too): see :func:`mlflow_ready`."""
    if _PREFETCH is not None:
        _PREFETCH.join()
