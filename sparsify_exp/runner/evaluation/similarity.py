"""``embedding_similarity``: how far the sparsified model's sentence embeddings drifted from
the dense model's, on held-out text.

The dense embeddings are computed once, before the first step (``on_start``), and kept (a
float32 vector a sample, not a copy of the model); the sparse ones after the squash
(``on_end``). Per sample, the cosine between the two; logged: ``cosine_mean`` and
``cosine_p05`` (the 5th percentile: the samples hurt most). Nothing is logged for the dense
model against itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from sparsify_exp.runner.evaluation.base import EvalContext, Evaluator, Metrics
from sparsify_exp.runner.evaluation.text import batches, load_texts, require_model


def embed(
    model: Any, tokenizer: Any, texts: list[str], seq_len: int, batch_size: int, pooling: str
) -> torch.Tensor:
    """Float32 ``(samples, hidden)`` embeddings: the last hidden state, mean-pooled over the
    tokens (``mean``) or the first token (``cls``)."""
    out = []
    with torch.no_grad():
        for batch in batches(model, tokenizer, texts, seq_len, batch_size):
            result = model(**batch, output_hidden_states=True)
            hidden = getattr(result, "last_hidden_state", None)
            if hidden is None:
                hidden = result.hidden_states[-1]
            hidden = hidden.float()
            if pooling == "cls":
                out.append(hidden[:, 0])
            else:
                mask = batch["attention_mask"].unsqueeze(-1).float()
                out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out).cpu()


class EmbeddingSimilarityEvaluator(Evaluator):
    """Cosine between the dense and the sparsified model's embeddings of each text sample."""

    name = "embedding_similarity"
    headline = ("cosine_mean",)

    def __init__(
        self,
        text: str | Sequence[str],
        max_samples: int = 256,
        seq_len: int = 128,
        batch_size: int = 32,
        pooling: Literal["mean", "cls"] = "mean",
        name: str = "embedding_similarity",
    ) -> None:
        for key, value in (("max_samples", max_samples), ("seq_len", seq_len)):
            if int(value) < 1:
                raise ValueError(f"{key}={value}: must be >= 1")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling={pooling!r}: must be one of mean, cls")
        self.texts = load_texts(text, int(max_samples))
        self.seq_len, self.batch_size, self.pooling = int(seq_len), int(batch_size), pooling
        self.name = name
        self._dense: torch.Tensor | None = None

    def _embed(self, ctx: EvalContext) -> torch.Tensor:
        model, tokenizer = require_model(self.name, ctx)
        return embed(model, tokenizer, self.texts, self.seq_len, self.batch_size, self.pooling)

    def on_start(self, ctx: EvalContext) -> Metrics:
        self._dense = self._embed(ctx)
        return {}

    def on_end(self, ctx: EvalContext) -> Metrics:
        if self._dense is None:
            raise RuntimeError(f"{self.name}: on_end before on_start")
        cos = torch.nn.functional.cosine_similarity(self._dense, self._embed(ctx), dim=1)
        cos = cos.double()
        return {
            f"{self.name}/cosine_mean": float(cos.mean()),
            f"{self.name}/cosine_p05": float(torch.quantile(cos, 0.05)),
            f"{self.name}/samples": float(cos.numel()),
        }
