"""The DLRM-style click model's embedding rows, by norm against by usage: held-out AUC
against row sparsity (library only, no MLflow; the runner form is in docs/evaluation.md).

    python scripts/study_dlrm_rows.py
    python scripts/study_dlrm_rows.py --levels 0.9 0.95 0.99 --batches 5

Usage is counted over ``--batches`` calibration batches of the training split (the runner's
``calibration=batches`` default: 20 x 512 samples), so held-out clicks stay unseen.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from sparsify_exp import RowSparsifier, collect
from sparsify_exp.runner.examples.dlrm import DLRM, auc, calibration_batches

SCORES = ("norm", "usage", "usage_then_norm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--levels",
        type=float,
        nargs="+",
        default=[0.5, 0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99],
    )
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = DLRM()
    start = time.perf_counter()
    batches = calibration_batches(args.batches, args.batch_size)
    stats = collect(dense, batches, needs=("row_counts",))
    seconds = time.perf_counter() - start
    counts = stats.row_counts
    seen = sum(int((c > 0).sum()) for c in counts.values())
    total = sum(c.numel() for c in counts.values())
    print(
        f"dense AUC {auc(dense)['auc']:.4f}; calibration: {len(batches)} batches in "
        f"{seconds:.2f} s, {seen} of {total} rows looked up\n"
    )
    print("| rows removed | " + " | ".join(f"AUC by {s}" for s in SCORES) + " |")
    print("|---|" + "---|" * len(SCORES))
    for level in args.levels:
        cells = []
        for score in SCORES:
            model = copy.deepcopy(dense)
            sp = RowSparsifier(sparsity_level=level, score=score)
            for name, param in model.named_parameters():
                if name.startswith("embeddings."):
                    config = {"row_counts": counts[name]} if score != "norm" else {}
                    sp.add_data(name, param, **config)
            sp.step()
            sp.squash_mask()
            cells.append(f"{auc(model)['auc']:.4f}")
        print(f"| {level:.0%} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
