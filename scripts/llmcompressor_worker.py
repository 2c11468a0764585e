"""llmcompressor's side of scripts/bench_vs_llmcompressor.py, run in the peer's own virtualenv.

Prunes a model's encoder Linear weights one-shot with ``WandaPruningModifier`` or
``SparseGPTModifier`` on calibration tokens saved by the bench (the same tokens ours use),
and writes the pruned weights plus the wall time and peak memory to ``--out``. It imports
nothing from sparsify_exp: llmcompressor pins its own torch and transformers.

    <peer venv>/bin/python scripts/llmcompressor_worker.py --model DIR --tokens calib.pt \
        --method wanda --sparsity 0.5 --mask-structure 0:0 --out result.pt
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from importlib.metadata import version


def peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``: ``ru_maxrss`` would carry the parent's peak across
    the fork and exec of a subprocess)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask-structure", default="0:0")
    parser.add_argument("--pipeline", default="sequential")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModel

    torch.manual_seed(0)
    tokens = torch.load(args.tokens)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    model = AutoModel.from_pretrained(args.model, local_files_only=True).eval()
    before_rss = peak_rss_mib()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})
    kind = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
    modifier = kind(
        sparsity=args.sparsity,
        mask_structure=args.mask_structure,
        targets=["Linear"],
        ignore=["re:.*pooler.*"],
    )
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=ids.shape[0],
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
        max_seq_length=ids.shape[1],
        pipeline=args.pipeline,
        sequential_targets=["BertLayer"],
    )
    seconds = time.perf_counter() - start
    weights = {
        f"{name}.weight": module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("encoder.")
    }
    info = {
        "seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_mib": before_rss,
        "versions": {p: version(p) for p in ("llmcompressor", "torch", "transformers")},
        "python": sys.version.split()[0],
    }
    torch.save({"weights": weights, "info": json.dumps(info)}, args.out)


if __name__ == "__main__":
    main()
