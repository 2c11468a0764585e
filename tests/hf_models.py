"""Tiny Hugging Face models built from a config (no download), with an offline tokenizer."""

from __future__ import annotations

from pathlib import Path

WORDS = (  # noqa: SIM905 (a readable word list)
    "the a of to and in is it that for on with as was he be by this are at from or an "
    "which one you all have not but they his her she we can will there their what so up "
    "out if about who get would make like time just him know take people into year your "
    "good some could them see other than then now look only come its over think also back "
    "after use two how our work first well way even new want because any these give day most "
    "us model data sparse weight mask table row value text python function return list"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tokenizer(folder: Path) -> None:
    """A WordPiece tokenizer over a small English vocabulary, saved into ``folder``."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(str(folder))


def tiny_bert(folder: Path, dtype: str = "float32", tokenizer: bool = True) -> Path:
    """A 2-layer BERT (hidden 32) saved with ``save_pretrained``."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(config).to(getattr(torch, dtype))
    model.save_pretrained(str(folder))
    if tokenizer:
        write_tokenizer(folder)
    return folder


def tiny_gpt2(folder: Path) -> Path:
    """A 2-layer GPT-2 whose LM head is tied to its word embeddings."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(SPECIAL) + len(WORDS), n_positions=64, n_embd=32, n_layer=2, n_head=2
    )
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    write_tokenizer(folder)
    return folder
