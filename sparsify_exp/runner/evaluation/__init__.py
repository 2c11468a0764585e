"""Quality evaluators: what a mask cost."""

from sparsify_exp.runner.evaluation.base import EvalContext, Evaluator, Metrics
from sparsify_exp.runner.evaluation.embedding_bag import EmbeddingBagEvaluator
from sparsify_exp.runner.evaluation.fidelity import FidelityEvaluator
from sparsify_exp.runner.evaluation.task import TaskEvaluator, resolve_callable

__all__ = [
    "EmbeddingBagEvaluator",
    "EvalContext",
    "Evaluator",
    "FidelityEvaluator",
    "Metrics",
    "TaskEvaluator",
    "resolve_callable",
]
