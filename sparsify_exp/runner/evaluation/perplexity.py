"""``perplexity``: held-out perplexity of a causal language model, dense and sparsified.

Each text sample (cut to ``seq_len`` tokens) is scored by next-token loss; perplexity is
``exp`` of the mean loss over every predicted token. The dense value is measured before the
first step (``on_start``), the sparse one after the squash (``on_end``); ``ratio`` is
sparse / dense (1 = no loss, higher is worse).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sparsify_exp.runner.evaluation.base import EvalContext, Evaluator, Metrics
from sparsify_exp.runner.evaluation.text import batches, load_texts, require_model


class PerplexityEvaluator(Evaluator):
    name = "perplexity"
    headline = ("ratio",)

    def __init__(
        self,
        text: str | Sequence[str],
        max_samples: int = 256,
        seq_len: int = 128,
        batch_size: int = 16,
        name: str = "perplexity",
    ) -> None:
        for key, value in (("max_samples", max_samples), ("seq_len", seq_len)):
            if int(value) < 2:
                raise ValueError(f"{key}={value}: must be >= 2")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.texts = load_texts(text, int(max_samples))
        self.seq_len, self.batch_size, self.name = int(seq_len), int(batch_size), name
        self._dense: float | None = None

    def perplexity(self, ctx: EvalContext) -> float:
        model, tokenizer = require_model(self.name, ctx, causal=True)
        total, tokens = 0.0, 0
        with torch.no_grad():
            for batch in batches(model, tokenizer, self.texts, self.seq_len, self.batch_size):
                logits = getattr(model(**batch), "logits", None)
                if logits is None:
                    raise ValueError(
                        f"{self.name} needs a causal language model "
                        "(data.auto_class=AutoModelForCausalLM)"
                    )
                target = batch["input_ids"][:, 1:]
                keep = batch["attention_mask"][:, 1:].bool()
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), target, reduction="none"
                )
                total += float(loss[keep].sum())
                tokens += int(keep.sum())
        if tokens == 0:
            raise ValueError(f"{self.name}: no sample has two tokens to score")
        return math.exp(total / tokens)

    def on_start(self, ctx: EvalContext) -> Metrics:
        self._dense = self.perplexity(ctx)
        return {f"{self.name}/dense": self._dense}

    def on_end(self, ctx: EvalContext) -> Metrics:
        sparse = self.perplexity(ctx)
        out = {f"{self.name}/sparse": sparse}
        if self._dense is not None:
            out[f"{self.name}/ratio"] = sparse / self._dense
        return out
