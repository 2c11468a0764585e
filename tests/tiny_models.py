"""Small models built from a config for the calibration tests: a BERT encoder with its own
word-piece tokenizer (a language model's data source), and an MLP's input batches."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from sparsify_exp.runner.data import DataBundle

TOKENIZER = True  # this data source gives a tokenizer: calibration=text may use it
MODEL = True

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "with",
    "as",
    "by",
    "this",
    "be",
    "are",
    "from",
    "at",
    "or",
    "an",
    "not",
    "have",
    "model",
    "weight",
    "mask",
    "row",
    "table",
    "token",
    "text",
    "sparse",
    "dense",
    "data",
    "input",
    "output",
    "layer",
    "norm",
    "score",
]


def tokenizer():
    from transformers import BertTokenizer

    folder = Path(tempfile.mkdtemp(prefix="tiny_bert_vocab_"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab_file=str(folder / "vocab.txt"))


def bert(seed: int = 0) -> DataBundle:
    """A 2-layer BERT (hidden 32) built from a config; its Linear weights are the data and its
    tokenizer comes along for calibration=text."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tok = tokenizer()
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    linears = {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    return DataBundle(named_data=linears, model=model, tokenizer=tok)


def mlp_inputs(batches: int = 4, batch_size: int = 16, features: int = 32, seed: int = 7):
    """Inputs of data=model's MLP whose features differ in scale by 1000x."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, features)
    return [torch.randn(batch_size, features, generator=gen) * scale for _ in range(batches)]
