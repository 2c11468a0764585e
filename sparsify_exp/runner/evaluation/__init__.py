"""Quality evaluators: what a mask cost."""

from sparsify_exp.runner.evaluation.base import DenseReference, EvalContext, Evaluator, Metrics
from sparsify_exp.runner.evaluation.embedding_bag import EmbeddingBagEvaluator
from sparsify_exp.runner.evaluation.fidelity import FidelityEvaluator
from sparsify_exp.runner.evaluation.perplexity import PerplexityEvaluator
from sparsify_exp.runner.evaluation.similarity import EmbeddingSimilarityEvaluator
from sparsify_exp.runner.evaluation.task import TaskEvaluator, resolve_callable

__all__ = [
    "DenseReference",
    "EmbeddingBagEvaluator",
    "EmbeddingSimilarityEvaluator",
    "EvalContext",
    "Evaluator",
    "FidelityEvaluator",
    "Metrics",
    "PerplexityEvaluator",
    "TaskEvaluator",
    "resolve_callable",
]
