"""Benchmark: sparsify_exp's data sparsifier against torch's reference, in one process.

    python scripts/bench_data_sparsifier.py            # the default sizes (about a minute)
    python scripts/bench_data_sparsifier.py --big      # also step an 8 GiB table (ours only)

Prints ratios, since absolute seconds on a shared machine mean little. Peak memory is the
rise of the process's peak RSS (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
during one call, relative to the data's size.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.ao.pruning._experimental.data_sparsifier import (
    BaseDataSparsifier as RefBase,
)
from torch.ao.pruning._experimental.data_sparsifier import (
    DataNormSparsifier as RefDataNorm,
)

from sparsify_exp import DataNormSparsifier, FirstRowSparsifier


class RefFirstRow(RefBase):
    def update_mask(self, name, data, **kwargs):
        self.get_mask(name)[0] = 0


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def interleaved_best(fns: dict[str, tuple[Callable[[], object], int]], rounds: int) -> dict:
    """Best time of each function over rounds that alternate between them, so a burst of
    load on a shared machine slows every side alike instead of one."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for label, (fn, repeats) in fns.items():
            best[label] = min(best[label], best_seconds(fn, repeats))
    return best


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_added_bytes(fn: Callable[[], object]) -> int:
    """Rise of peak RSS while ``fn`` runs (what it allocated at its busiest moment)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _vm_kib("VmRSS")
    fn()
    return (_vm_kib("VmHWM") - before) * 1024


def bench_big_table(rows: int, cols: int, level: float, block: tuple[int, int]) -> None:
    print(f"\n== nn.EmbeddingBag({rows:_}, {cols}) fp32, level {level}, block {block} ==")
    torch.manual_seed(0)
    table = nn.EmbeddingBag(rows, cols)
    weight = table.weight.detach()
    data_bytes = weight.numel() * weight.element_size()

    # what RSS shows for exactly one byte an entry, measured the same way (page rounding etc.)
    one_byte = peak_added_bytes(lambda: torch.ones(weight.shape, dtype=torch.bool))
    ours = DataNormSparsifier(sparsity_level=level, sparse_block_shape=block)
    add_peak = peak_added_bytes(lambda: ours.add_data("emb", table))
    ours_peak = peak_added_bytes(ours.step)
    ref = RefDataNorm(sparsity_level=level, sparse_block_shape=block)
    ref_add_peak = peak_added_bytes(lambda: ref.add_data("emb", table))
    ref_peak = peak_added_bytes(ref.step)
    same = torch.equal(ours.get_mask("emb"), ref.get_mask("emb").bool())

    best = interleaved_best(
        {
            "read": (lambda: weight.abs().sum(), 3),
            "ours": (ours.step, 3),
            "ref": (ref.step, 1),
        },
        rounds=3,
    )
    read_pass, ours_step, ref_step = best["read"], best["ours"], best["ref"]
    ours_mask = ours.get_mask("emb")
    mask_bytes = ours_mask.numel() * ours_mask.element_size()
    ref = None  # free the reference before the next benchmark
    gc.collect()

    print(f"read pass x.abs().sum():             {read_pass * 1e3:8.1f} ms")
    print(f"step, ours:                          {ours_step * 1e3:8.1f} ms")
    print(f"step, reference:                     {ref_step * 1e3:8.1f} ms")
    print(f"speed-up over reference:             {ref_step / ours_step:8.1f}x   (target >= 25x)")
    print(f"ours / read pass:                    {ours_step / read_pass:8.2f}x   (target <= 3x)")
    print(f"reference / read pass:               {ref_step / read_pass:8.1f}x")
    print(
        f"peak added by a step, ours:          {ours_peak / data_bytes:8.2f}x data"
        "   (target <= 0.5x)"
    )
    print(f"peak added by a step, reference:     {ref_peak / data_bytes:8.2f}x data")
    print(
        f"add_data peak, ours:                 {add_peak / weight.numel():8.2f} B/entry"
        f"   (target <= 1; a bare 1-byte mask measures {one_byte / weight.numel():.2f})"
    )
    print(f"add_data peak, reference:            {ref_add_peak / weight.numel():8.2f} B/entry")
    print(f"mask, ours:                          {mask_bytes / weight.numel():8.2f} B/entry")
    print(f"masks identical to the reference:    {same}")


def bench_many_small(count: int) -> None:
    print(f"\n== {count:_} small tensors (8 x 16 fp32): per-tensor cost ==")
    torch.manual_seed(0)
    tensors = [torch.randn(8, 16) for _ in range(count)]

    def run(make: Callable[[], object], name_format: str) -> dict[str, float]:
        sparsifier = make()
        timings = {}
        start = time.perf_counter()
        for i, tensor in enumerate(tensors):
            sparsifier.add_data(name_format.format(i), tensor.clone())
        timings["add"] = time.perf_counter() - start
        start = time.perf_counter()
        sparsifier.step()
        timings["step"] = time.perf_counter() - start
        start = time.perf_counter()
        sparsifier.squash_mask()
        timings["squash"] = time.perf_counter() - start
        return {k: v / count * 1e6 for k, v in timings.items()}

    pairs = [
        ("first row", FirstRowSparsifier, RefFirstRow),
        ("data norm", DataNormSparsifier, RefDataNorm),
    ]
    for label, ours_cls, ref_cls in pairs:
        # ours with the dotted names of named_parameters(), which the reference rejects
        ours = run(ours_cls, "layer.{}.weight")
        ref = run(ref_cls, "layer_{}_weight")
        for phase in ("add", "step", "squash"):
            print(
                f"{label:10s} {phase:6s}: ours {ours[phase]:7.1f} us, reference "
                f"{ref[phase]:7.1f} us, reference/ours {ref[phase] / ours[phase]:5.2f}x"
            )


def bench_eight_gib() -> None:
    rows, cols = 16_000_000, 128
    print(f"\n== {rows:_} x {cols} fp32 (8 GiB), level 0.8, block (1, 4): ours only ==")
    data = torch.empty(rows, cols)
    for start in range(0, rows, 1_000_000):
        data[start : start + 1_000_000].uniform_(-1, 1)
    sparsifier = DataNormSparsifier(sparsity_level=0.8)
    sparsifier.add_data("table", data)
    start = time.perf_counter()
    peak = peak_added_bytes(sparsifier.step)
    seconds = time.perf_counter() - start
    kept = int(torch.count_nonzero(sparsifier.get_mask("table"))) / data.numel()
    print(
        f"stepped in {seconds:.1f} s, peak added {peak / 2**30:.2f} GiB "
        f"({peak / (data.numel() * 4):.2f}x data), kept {kept:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=64)
    parser.add_argument("--small", type=int, default=10_000, help="count of small tensors")
    parser.add_argument("--big", action="store_true", help="also step an 8 GiB table")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_big_table(args.rows, args.cols, 0.8, (1, 4))
    bench_many_small(args.small)
    if args.big:
        bench_eight_gib()


if __name__ == "__main__":
    main()
