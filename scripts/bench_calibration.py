"""Benchmark: what collecting calibration statistics costs over the forward passes alone.

    python scripts/bench_calibration.py      # MiniLM (sparsify-exp[studies]) and DLRM
    python scripts/bench_calibration.py --only dlrm --rounds 7

For each model the same batches run under ``torch.inference_mode()`` plainly and through
:func:`sparsify_exp.calibration.collect` (hooks on every Linear input / embedding lookup),
alternating, ``--rounds`` times; the best time of each is kept (a shared machine's noise only
adds) and the ratios printed, of wall time and of the process's CPU time (steadier when
other jobs share the cores). Target: at most 1.2x.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sparsify_exp.calibration import collect, run_batch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def plain(model, batches) -> None:
    with torch.inference_mode():
        for batch in batches:
            run_batch(model, batch)


def best_of(rounds: int, model, batches, needs, clock) -> tuple[float, float]:
    plain_s, collect_s = [], []
    plain(model, batches[:1])  # warm-up: first-call allocations, lazy inits
    for _ in range(rounds):
        start = clock()
        plain(model, batches)
        plain_s.append(clock() - start)
        start = clock()
        collect(model, batches, needs=needs)
        collect_s.append(clock() - start)
    return min(plain_s), min(collect_s)


def minilm_case(samples: int, seq_len: int, batch_size: int):
    from minilm_study import batches_of, calibration_tokens, docstring_corpus, load_minilm

    model, tokenizer, _ = load_minilm()
    docs, _ = docstring_corpus()
    tokens = calibration_tokens(tokenizer, docs, samples, seq_len)
    label = f"all-MiniLM-L6-v2, {samples} x {seq_len} tokens, batch {batch_size}"
    return label, model, batches_of(tokens, batch_size)


def dlrm_case(batches: int, batch_size: int):
    from sparsify_exp.runner.examples.dlrm import DLRM, calibration_batches

    label = f"DLRM click model, {batches} x {batch_size} samples"
    return label, DLRM().eval(), calibration_batches(batches, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["minilm", "dlrm"], default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.rounds}\n")
    print(
        "| model and batches | statistics | plain s (CPU s) | with collection s (CPU s) | "
        "ratio wall | ratio CPU |"
    )
    print("|---|---|---|---|---|---|")
    cases = []
    if args.only in (None, "minilm"):
        cases.append(minilm_case(args.samples, args.seq_len, args.batch_size))
    if args.only in (None, "dlrm"):
        cases.append(dlrm_case(20, 512))
    for label, model, batches in cases:
        for needs in (("input_norms",), ("row_counts",), ("input_norms", "row_counts")):
            base, hooked = best_of(args.rounds, model, batches, needs, time.perf_counter)
            base_cpu, hooked_cpu = best_of(args.rounds, model, batches, needs, time.process_time)
            print(
                f"| {label} | {' + '.join(needs)} | {base:.3f} ({base_cpu:.3f}) | "
                f"{hooked:.3f} ({hooked_cpu:.3f}) | {hooked / base:.2f}x | "
                f"{hooked_cpu / base_cpu:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
