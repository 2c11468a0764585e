"""Quality evaluators: what a mask cost."""

from sparsify_exp.evaluation.base import EvalContext, Evaluator, Metrics
from sparsify_exp.evaluation.embedding_bag import EmbeddingBagEvaluator
from sparsify_exp.evaluation.fidelity import FidelityEvaluator
from sparsify_exp.evaluation.task import TaskEvaluator, resolve_callable

__all__ = [
    "EmbeddingBagEvaluator",
    "EvalContext",
    "Evaluator",
    "FidelityEvaluator",
    "Metrics",
    "TaskEvaluator",
    "resolve_callable",
]
