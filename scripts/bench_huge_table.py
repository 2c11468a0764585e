"""``bench_data_sparsifier.py --huge``: tables larger than memory, stepped memory-mapped.

For each size (32 GiB and 8 GiB by default) the script writes an fp32 safetensors table
(``rows x 128``) a chunk at a time, reads it once with ``cat file > /dev/null``, then steps
``DataNormSparsifier(0.8, (1, 4))`` and ``MagnitudeSparsifier(0.8)`` on it memory-mapped
(:mod:`sparsify_exp.streaming`) and writes each squash to a new file. Before each phase the
file's pages are dropped from the page cache (``posix_fadvise(DONTNEED)``), so every phase
reads the disk as ``cat`` did.

The table is an embedding table sorted by how often rows are looked up: row ``i`` holds
``uniform(-1, 1) / (1 + 64 i / rows)``. At level 0.8 its tail rows go whole, and the squash
leaves those chunks as holes, so the 32 GiB input and its output fit on the disk together.

Peak anonymous memory is the largest ``RssAnon`` (``/proc/self/status``) that a thread
sampling every 5 ms sees during the phase: the process's own memory, without the file's
pages (``VmHWM`` counts those: mapped pages that were read show in RSS until the kernel
drops them). Masks are checked against the in-memory sparsifier when the table fits in a
third of memory; otherwise by a chunked pass over the data that checks the definition of
the result: exactly ``round(0.8 * n)`` items removed, none of them ranking above a kept one,
and at equal scores the removed before the kept. The squashed files are checked entry for
entry (in memory) or on 64 stripes (``where(mask, input, 0)``).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sparsify_exp import DataNormSparsifier, MagnitudeSparsifier
from sparsify_exp.sparsifier.mask_bits import pack_mask
from sparsify_exp.sparsifier.packed_mask import PackedMask
from sparsify_exp.sparsifier.packed_select import BlockScoreKeys, EntryKeys, _trim_heap
from sparsify_exp.sparsifier.select import key_dtype_for
from sparsify_exp.streaming import add_mapped, memory_bytes, open_checkpoint, write_squashed

COLS = 128
LEVEL = 0.8
_ROWS_A_CHUNK = 1 << 17  # 64 MiB of fp32 rows written at a time
GIB = 1 << 30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class AnonPeak:
    """The largest ``RssAnon`` seen while the ``with`` block runs (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status_kib("RssAnon") * 1024)

    def __enter__(self) -> AnonPeak:
        gc.collect()
        self.before = _status_kib("RssAnon") * 1024
        self.peak = self.before
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon") * 1024)


def evict(path: Path) -> None:
    """Drops the file's (clean) pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_table(path: Path, rows: int) -> float:
    """Writes the ``rows x COLS`` fp32 table a chunk at a time; returns the seconds taken."""
    header = json.dumps(
        {"table": {"dtype": "F32", "shape": [rows, COLS], "data_offsets": [0, rows * COLS * 4]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for first in range(0, rows, _ROWS_A_CHUNK):
            count = min(_ROWS_A_CHUNK, rows - first)
            chunk = torch.rand(count, COLS, generator=generator).mul_(2).sub_(1)
            scale = torch.arange(first, first + count, dtype=torch.float64).mul_(64 / rows)
            chunk.div_(scale.add_(1).float()[:, None])
            f.write(chunk.numpy().data)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def write_speed(directory: Path, size: int = 2 * GIB) -> float:
    """Bytes a second written (and synced) to ``directory``'s disk: a random 64 MiB buffer
    written over and over."""
    buffer = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8).numpy().data
    path = directory / "write_speed.tmp"
    start = time.perf_counter()
    try:
        with open(path, "wb") as f:
            for _ in range(size // len(buffer)):
                f.write(buffer)
            f.flush()
            os.fsync(f.fileno())
        return size / (time.perf_counter() - start)
    finally:
        path.unlink(missing_ok=True)


def cat_seconds(path: Path) -> float:
    evict(path)
    start = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def sparsifiers() -> dict[str, Callable[[], object]]:
    return {
        "data norm (1, 4)": lambda: DataNormSparsifier(sparsity_level=LEVEL),
        "magnitude": lambda: MagnitudeSparsifier(sparsity_level=LEVEL),
    }


def _keys(label: str, data: torch.Tensor):
    if label.startswith("data norm"):
        return BlockScoreKeys(data, (1, 4), "L1"), 4
    return EntryKeys(data, key_dtype_for(data.dtype)), 1


def check_chunked(label: str, data: torch.Tensor, mask: PackedMask) -> bool:
    """The definition of the result, in chunks: ``round(LEVEL * n)`` items removed, the
    highest removed key at most the lowest kept one, and at that key the removed first."""
    source, per_item = _keys(label, data)
    flat = mask.reshape(-1)
    removed, top_removed, low_kept = 0, -1, None
    for start, keys in source.chunks():
        # an item's bit: the bit of its first entry (blocks of (1, 4) start every 4 entries)
        keep = flat.read(start * per_item, (start + keys.numel()) * per_item)[::per_item]
        removed += int(keys.numel() - torch.count_nonzero(keep))
        if bool((~keep).any()):
            top_removed = max(top_removed, int(keys[~keep].max()))
        if bool(keep.any()):
            low = int(keys[keep].min())
            low_kept = low if low_kept is None else min(low_kept, low)
    ok = removed == round(LEVEL * source.numel) and (low_kept is None or top_removed <= low_kept)
    if ok and top_removed == low_kept:  # a tie at the threshold: the removed ones come first
        last_removed, first_kept = -1, None
        for start, keys in source.chunks():
            keep = flat.read(start * per_item, (start + keys.numel()) * per_item)[::per_item]
            at = (keys == top_removed).nonzero().squeeze(1)
            gone, kept = at[~keep[at]], at[keep[at]]
            if gone.numel():
                last_removed = start + int(gone[-1])
            if kept.numel() and first_kept is None:
                first_kept = start + int(kept[0])
        ok = first_kept is None or last_removed < first_kept
    return ok


def check_in_memory(label: str, path: Path, mask: PackedMask, out: Path) -> tuple[bool, bool]:
    """(mask, squashed file) equal to the in-memory sparsifier's on the loaded table."""
    from safetensors.torch import load_file

    table = load_file(str(path), backend="pread")["table"]
    ref = sparsifiers()[label]()
    ref.add_data("table", table)
    ref.step()
    same_mask = torch.equal(pack_mask(ref.get_mask("table")), mask.bits)
    ref.squash_mask()
    written = open_checkpoint(out, mmap=True).tensors["table"].reshape(-1)
    flat = table.reshape(-1)
    step = 1 << 24
    same_file = all(
        torch.equal(written[i : i + step], flat[i : i + step]) for i in range(0, flat.numel(), step)
    )
    return same_mask, same_file


def check_stripes(data: torch.Tensor, mask: PackedMask, out: Path, stripes: int = 64) -> bool:
    """The squashed file equals ``where(mask, input, 0)`` on evenly spaced stripes."""
    written = open_checkpoint(out, mmap=True).tensors["table"].reshape(-1)
    flat = data.reshape(-1)
    per = 1 << 22
    for i in range(stripes):
        start = i * (flat.numel() - per) // (stripes - 1)
        keep = mask.reshape(-1).read(start, start + per)
        expected = torch.where(keep, flat[start : start + per], 0.0)
        if not torch.equal(written[start : start + per], expected):
            return False
    return True


def run_size(directory: Path, gib: int, keep: bool) -> None:
    rows = gib * GIB // (COLS * 4)
    table_bytes = rows * COLS * 4
    path = directory / f"huge_{gib}gib.safetensors"
    out = directory / f"huge_{gib}gib.sparse.safetensors"
    free = shutil.disk_usage(directory).free
    if not path.exists() and free < table_bytes * 1.5:
        print(f"\n== {gib} GiB: skipped, {free / GIB:.1f} GiB free in {directory} ==")
        return
    print(f"\n== {rows:_} x {COLS} fp32 = {gib} GiB (memory {memory_bytes() / GIB:.1f} GiB) ==")
    if not path.exists():
        seconds = make_table(path, rows)
        print(f"table written in {seconds:.1f} s ({table_bytes / seconds / 1e9:.2f} GB/s)")
    cat = cat_seconds(path)
    print(
        f"cat file > /dev/null:       {cat:7.1f} s  ({table_bytes / cat / 1e9:.2f} GB/s read; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    fits = table_bytes * 2 < memory_bytes()
    try:
        for label, make in sparsifiers().items():
            evict(path)
            ckpt = open_checkpoint(path, mmap=True)
            sp = make()
            add_mapped(sp, "table", ckpt.tensors["table"])
            with AnonPeak() as stepping:
                start, cpu = time.perf_counter(), time.process_time()
                sp.step()
                step_s, step_cpu = time.perf_counter() - start, time.process_time() - cpu
            evict(path)
            with AnonPeak() as squashing:
                start, cpu = time.perf_counter(), time.process_time()
                written = write_squashed(ckpt.tensors, sp, out, source=ckpt)
                squash_s, squash_cpu = time.perf_counter() - start, time.process_time() - cpu
            mask = sp.get_mask("table")
            on_disk = out.stat().st_blocks * 512
            peak = max(stepping.peak, squashing.peak)
            print(
                f"{label:18s} step {step_s:6.1f} s = {step_s / cat:4.2f}x cat (target <= 2x); "
                f"step + squash {step_s + squash_s:6.1f} s = {(step_s + squash_s) / cat:4.2f}x "
                "(target <= 4x)"
            )
            print(
                f"{'':18s} peak RssAnon {peak / GIB:5.2f} GiB = {peak / table_bytes:4.2f}x the "
                f"table (target <= 0.3x; step +{(stepping.peak - stepping.before) / GIB:.2f} "
                f"GiB, squash +{(squashing.peak - squashing.before) / GIB:.2f} GiB over "
                f"{stepping.before / GIB:.2f} GiB before)"
            )
            print(
                f"{'':18s} CPU time: step {step_cpu:.1f} s, squash {squash_cpu:.1f} s; load "
                f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
            )
            print(
                f"{'':18s} output {written.file_bytes / GIB:.2f} GiB, {on_disk / GIB:.2f} GiB on "
                f"disk (holes where chunks are removed whole), compressed "
                f"{written.compressed_bytes / GIB:.2f} GiB"
            )
            data = ckpt.tensors["table"]
            if fits:
                del ckpt, sp, data
                gc.collect()
                same_mask, same_file = check_in_memory(label, path, mask, out)
                print(
                    f"{'':18s} mask identical to the in-memory step: {same_mask}; squashed file "
                    f"identical to the in-memory squash: {same_file}"
                )
            else:
                ok = check_chunked(label, data, mask)
                stripes = check_stripes(data, mask, out)
                print(
                    f"{'':18s} chunked check (exact count, nothing removed ranks above a kept "
                    f"item, ties by position): {ok}; squashed file on 64 stripes: {stripes}"
                )
                del ckpt, sp, data
            del mask
            gc.collect()
            _trim_heap()  # the in-memory check's freed pages, before the next peak is measured
            if not keep:
                out.unlink(missing_ok=True)
    finally:
        if not keep:
            out.unlink(missing_ok=True)
            path.unlink(missing_ok=True)


def main(directory: Path, sizes: list[int], keep: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    speed = write_speed(directory)
    print(f"\n== --huge: tables memory-mapped from {directory} ==")
    print(f"disk write speed (2 GiB, fsync): {speed / 1e9:.2f} GB/s")
    for gib in sizes:
        run_size(directory, gib, keep)
