"""The experiment runner (Hydra + MLflow) around the library: ``python -m sparsify_exp``.

One module a job: :mod:`~.cli` (entry points), :mod:`~.config` (validation), :mod:`~.build`,
:mod:`~.job` (the straight-line job), :mod:`~.step_metrics`, :mod:`~.artifacts`,
:mod:`~.tracking` (MLflow), :mod:`~.sweep` (a multirun's parent run), :mod:`~.report`;
:mod:`~.data` sources, :mod:`~.evaluation` evaluators, :mod:`~.examples`.
"""

from sparsify_exp.runner.cli import compose_config, main, run_overrides
from sparsify_exp.runner.job import run
from sparsify_exp.runner.sweep.callback import SweepCallback

__all__ = ["SweepCallback", "compose_config", "main", "run", "run_overrides"]
