"""Benchmark: sparsify_exp's data sparsifiers against torch's references, in one process.

    python scripts/bench_data_sparsifier.py            # the default sizes (a few minutes)
    python scripts/bench_data_sparsifier.py --big      # also step an 8 GiB table (ours only)
    python scripts/bench_data_sparsifier.py --only new --threads 1
    python scripts/bench_data_sparsifier.py --huge     # 32 and 8 GiB tables memory-mapped
    python scripts/bench_data_sparsifier.py --only devices   # the same steps on CPU and CUDA

Prints ratios, since absolute seconds on a shared machine mean little. Peak memory is the
rise of the process's peak RSS (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
during one call, relative to the data's size.

The magnitude, N:M, row and random sparsifiers are each timed against the torch function
their tests check them against (``prune.*``'s ``compute_mask``, the mask alone, without the
reparametrization around it; for N:M torch's reference ``DataNormSparsifier`` with
``zeros_per_block``), and ``scope="global"`` against ``prune.global_unstructured`` as users
call it; then a global step over >= 1 GiB of tables, for its peak memory.
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
from torch.nn.utils import prune

from sparsify_exp import (
    DataNormSparsifier,
    FirstRowSparsifier,
    MagnitudeSparsifier,
    NMSparsifier,
    RandomSparsifier,
    RowSparsifier,
)
from sparsify_exp.sparsifier.row import row_scores


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


def _row(label: str, ours_s: float, read_s: float, peak: float, ref_s: float | None, same) -> None:
    ref = (
        f"{ref_s * 1e3:9.0f} {ref_s / ours_s:8.1f}x" if ref_s is not None else f"{'-':>9} {'-':>9}"
    )
    print(f"{label:26s} {ours_s * 1e3:8.1f} {ours_s / read_s:7.2f}x {peak:8.2f}x {ref} {same!s:>9}")


def _header(title: str) -> None:
    print(f"\n== {title} ==")
    print("targets: step / read pass <= 3x, extra peak <= 0.5x data, speed-up >= 10x")
    print(
        f"{'sparsifier (reference)':26s} {'step ms':>8} {'/ read':>8} {'peak':>9} "
        f"{'ref ms':>9} {'speed-up':>9} {'same mask':>9}"
    )


def bench_new_sparsifiers(rows: int, cols: int, level: float) -> None:
    """Each new sparsifier's step on one table, beside its torch reference."""
    _header(f"nn.EmbeddingBag({rows:_}, {cols}) fp32, level {level}")
    torch.manual_seed(0)
    table = nn.EmbeddingBag(rows, cols)
    weight = table.weight.detach()
    data_bytes = weight.numel() * weight.element_size()

    def compute_mask(method: prune.BasePruningMethod) -> Callable[[], torch.Tensor]:
        return lambda: method.compute_mask(weight, default_mask=torch.ones_like(weight))

    def nm_reference() -> Callable[[], torch.Tensor]:
        ref = RefDataNorm(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
        ref.add_data("emb", table)

        def step() -> torch.Tensor:
            ref.step()
            return ref.get_mask("emb")

        return step

    cases = [
        (
            "magnitude (l1_unstructured)",
            MagnitudeSparsifier(sparsity_level=level),
            compute_mask(prune.L1Unstructured(level)),
            "equal",
        ),
        ("nm 2:4 (ref. DataNorm)", NMSparsifier(n=2, m=4), nm_reference(), "equal"),
        (
            "row L1 (ln_structured)",
            RowSparsifier(sparsity_level=level),
            compute_mask(prune.LnStructured(level, n=1, dim=0)),
            "rows",
        ),
        (
            "random (random_unstruct.)",
            RandomSparsifier(sparsity_level=level, seed=0),
            compute_mask(prune.RandomUnstructured(level)),
            "count",
        ),
    ]
    for label, ours, reference, compare in cases:
        ours.add_data("emb", table)
        peak = peak_added_bytes(ours.step) / data_bytes
        expected = reference() != 0
        mask = ours.get_mask("emb")
        if compare == "count":
            same = int(mask.sum()) == int(expected.sum())
        else:
            same = torch.equal(mask, expected.view(mask.shape))
            if not same and compare == "rows":
                same = _row_ties(weight, mask[:, 0], expected[:, 0], level)
        del expected
        best = interleaved_best(
            {
                "read": (lambda: weight.abs().sum(), 3),
                "ours": (ours.step, 3),
                "ref": (reference, 1),
            },
            rounds=2,
        )
        _row(label, best["ours"], best["read"], peak, best["ref"], same)
        ours.squash_mask(leave_parametrized=False)
        del ours, reference
        gc.collect()


def _row_ties(weight: torch.Tensor, ours: torch.Tensor, ref: torch.Tensor, level: float):
    """``"ties (n)"`` when the masks differ only on rows whose fp32 L1 norm equals the k-th
    lowest (torch's topk breaks such ties its own way, ours by position); else False."""
    scores = row_scores(weight, "L1")
    kth = scores.kthvalue(round(level * scores.numel())).values
    differ = ours != ref
    if int(ours.sum()) == int(ref.sum()) and bool((scores[differ] == kth).all()):
        return f"ties ({int(differ.sum())})"
    return False


def _tables(count: int, rows: int, cols: int) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [nn.EmbeddingBag(rows, cols).weight.detach() * (i + 1) for i in range(count)]


def _global_unstructured(weights: list[torch.Tensor], level: float) -> list[torch.Tensor]:
    """torch's global magnitude pruning as users call it, on modules sharing ``weights``."""
    modules = []
    for weight in weights:
        module = nn.Module()
        module.weight = nn.Parameter(weight, requires_grad=False)
        modules.append(module)
    prune.global_unstructured(
        [(m, "weight") for m in modules], pruning_method=prune.L1Unstructured, amount=level
    )
    return [m.weight_mask for m in modules]


def bench_global(count: int, rows: int, cols: int, level: float, reference: bool) -> None:
    """scope="global" over ``count`` tables, beside prune.global_unstructured."""
    weights = _tables(count, rows, cols)
    data_bytes = sum(w.numel() * w.element_size() for w in weights)
    _header(
        f"scope=global over {count} x ({rows:_}, {cols}) fp32 = {data_bytes / 2**30:.2f} GiB, "
        f"level {level}"
    )
    expected = None
    if reference:
        expected = [m != 0 for m in _global_unstructured(weights, level)]
        gc.collect()
    variants = [
        ("magnitude, global", MagnitudeSparsifier(sparsity_level=level, scope="global")),
        (
            "data norm (1,1), global",
            DataNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 1), scope="global"),
        ),
        ("data norm (1,4), global", DataNormSparsifier(sparsity_level=level, scope="global")),
    ]
    for label, ours in variants:
        for i, weight in enumerate(weights):
            ours.add_data(f"tables.{i}.weight", weight)
        peak = peak_added_bytes(ours.step) / data_bytes
        masks = [ours.get_mask(f"tables.{i}.weight") for i in range(count)]
        per_block = 4 if "(1,4)" in label else 1  # removed blocks: round(level * blocks)
        removed = sum(int((~m).sum()) for m in masks)
        exact = removed == per_block * round(level * sum(w.numel() for w in weights) / per_block)
        comparable = expected is not None and "(1,4)" not in label
        same = all(map(torch.equal, masks, expected)) if comparable else exact
        fns = {"read": (lambda: [w.abs().sum() for w in weights], 2), "ours": (ours.step, 2)}
        if comparable:
            fns["ref"] = (lambda: _global_unstructured(weights, level), 1)
        best = interleaved_best(fns, rounds=2)
        _row(label, best["ours"], best["read"], peak, best.get("ref"), same)
        ours.squash_mask(leave_parametrized=False)
        del ours, masks
        gc.collect()
    if expected is not None:
        peak = peak_added_bytes(lambda: _global_unstructured(weights, level)) / data_bytes
        print(f"{'global_unstructured peak':26s} {'':8} {'':8} {peak:8.2f}x")


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


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` then a wait for the GPU's queue, so a timing covers the kernels it launched."""
    if device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(device))


def _cuda_peak_added(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def bench_devices(rows: int, cols: int, level: float) -> None:
    """Each sparsifier's step on one table on the CPU and on the GPU, beside torch's
    reference on the GPU; masks compared across devices."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else None
    name = torch.cuda.get_device_name(0) if cuda else "no CUDA device: CPU column only"
    print(f"\n== devices: ({rows:_}, {cols}) fp32, level {level}; {name} ==")
    torch.manual_seed(0)
    weight = torch.randn(rows, cols)
    gpu_weight = weight.to(device) if cuda else None
    data_bytes = weight.numel() * weight.element_size()

    def ref_compute_mask(method: prune.BasePruningMethod) -> Callable[[], object]:
        return lambda: method.compute_mask(gpu_weight, default_mask=torch.ones_like(gpu_weight))

    def ref_data_norm(**kw: object) -> Callable[[], object]:
        ref = RefDataNorm(**kw)
        ref.add_data("t", gpu_weight.clone())
        return ref.step

    cases = [
        (
            "data norm (1,4)",
            lambda: DataNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 4)),
            lambda: ref_data_norm(sparsity_level=level, sparse_block_shape=(1, 4)),
        ),
        (
            "magnitude",
            lambda: MagnitudeSparsifier(sparsity_level=level),
            lambda: ref_compute_mask(prune.L1Unstructured(level)),
        ),
        (
            "nm 2:4",
            lambda: NMSparsifier(n=2, m=4),
            lambda: ref_data_norm(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2),
        ),
        (
            "row L1",
            lambda: RowSparsifier(sparsity_level=level),
            lambda: ref_compute_mask(prune.LnStructured(level, n=1, dim=0)),
        ),
        (
            "random",
            lambda: RandomSparsifier(sparsity_level=level, seed=0),
            lambda: ref_compute_mask(prune.RandomUnstructured(level)),
        ),
    ]
    print(
        f"{'sparsifier':18s} {'cpu ms':>9} {'cuda ms':>9} {'cpu/cuda':>9} {'ref cuda':>9} "
        f"{'ref/ours':>9} {'cuda peak':>10} {'same mask':>9}"
    )
    for label, make, make_ref in cases:
        cpu_sp = make()
        cpu_sp.add_data("t", weight)
        cpu_s = interleaved_best({"ours": (cpu_sp.step, 2)}, rounds=2)["ours"]
        if not cuda:
            print(f"{label:18s} {cpu_s * 1e3:9.1f} {'-':>9} {'-':>9} {'-':>9} {'-':>9} {'-':>10}")
            continue
        gpu_sp = make()
        gpu_sp.add_data("t", gpu_weight)
        gpu_sp.step()  # warm-up: kernels compiled, caches filled
        peak = _cuda_peak_added(gpu_sp.step, device) / data_bytes
        same = torch.equal(gpu_sp.get_mask("t").cpu(), cpu_sp.get_mask("t"))
        ref_step = make_ref()
        ref_step()
        best = interleaved_best(
            {"ours": (_synced(gpu_sp.step, device), 5), "ref": (_synced(ref_step, device), 2)},
            rounds=3,
        )
        print(
            f"{label:18s} {cpu_s * 1e3:9.1f} {best['ours'] * 1e3:9.2f} "
            f"{cpu_s / best['ours']:8.1f}x {best['ref'] * 1e3:9.2f} "
            f"{best['ref'] / best['ours']:8.1f}x {peak:9.2f}x {same!s:>9}"
        )
        del gpu_sp, ref_step
        torch.cuda.empty_cache()
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=64)
    parser.add_argument("--small", type=int, default=10_000, help="count of small tensors")
    parser.add_argument("--big", action="store_true", help="also step an 8 GiB table")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--only",
        choices=["all", "data_norm", "new", "global", "devices"],
        default="all",
        help="data_norm: the data norm comparisons; new: the other sparsifiers and scope=global; "
        "global: only the global step over >= 1 GiB of tables; devices: each sparsifier on the "
        "CPU and on CUDA, beside torch's reference on CUDA",
    )
    parser.add_argument(
        "--global-tables", type=int, default=4, help="tables for the >= 1 GiB global step"
    )
    parser.add_argument(
        "--global-rows",
        type=int,
        default=1 << 20,
        help="rows of each such table (x --cols fp32: 4 x 2**20 x 64 is 1 GiB)",
    )
    parser.add_argument(
        "--big-global-reference",
        action="store_true",
        help="also run prune.global_unstructured on the >= 1 GiB tables (about 4x their memory)",
    )
    parser.add_argument(
        "--huge",
        action="store_true",
        help="only the tables larger than memory: made on disk, stepped memory-mapped, squashed "
        "to new files (see scripts/bench_huge_table.py)",
    )
    parser.add_argument("--huge-gib", type=int, nargs="+", default=[32, 8], help="table sizes")
    parser.add_argument(
        "--huge-dir", type=Path, default=Path("bench_huge"), help="where the tables are written"
    )
    parser.add_argument("--keep", action="store_true", help="keep the --huge files")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.huge:
        from bench_huge_table import main as huge

        huge(args.huge_dir, args.huge_gib, args.keep)
        return
    if args.only == "devices":
        bench_devices(args.rows, args.cols, 0.8)
        return
    if args.only in ("all", "data_norm"):
        bench_big_table(args.rows, args.cols, 0.8, (1, 4))
        bench_many_small(args.small)
    if args.only in ("all", "new"):
        bench_new_sparsifiers(args.rows, args.cols, 0.8)
        # the same entries as one table, split in 4: the speed-up over global_unstructured
        bench_global(4, args.rows // 4, args.cols, 0.8, reference=True)
    if args.only in ("all", "new", "global"):
        # >= 1 GiB of tables: the peak memory of a global step
        bench_global(
            args.global_tables,
            args.global_rows,
            args.cols,
            0.8,
            reference=args.big_global_reference,
        )
    if args.big:
        bench_eight_gib()


if __name__ == "__main__":
    main()
