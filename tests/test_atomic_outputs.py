"""A process killed while it writes an output leaves no torn file under the output's name;
what it left (ours and safetensors' hidden temporary files) is removed by the next start on
that job folder and by sync."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sparsify_exp.atomic import atomic_save, is_leftover, partial_path, remove_leftovers

# Writes a 400 MB output through the runner's own DataBundle.save, in the format asked.
WRITER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from sparsify_exp.runner.data import DataBundle
    fmt, stem = sys.argv[1], Path(sys.argv[2])
    big = {"w": torch.ones(100_000_000)}
    print("writing", flush=True)
    DataBundle(named_data=big, format=fmt).save(stem)
    """
)


def _kill_while_writing(fmt: str, folder: Path) -> Path:
    """Starts a writer and kills it with SIGKILL once its partial file is growing."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, fmt, str(folder / "sparsified")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.monotonic() + 120
    while True:
        growing = [p for p in folder.iterdir() if is_leftover(p.name) and p.stat().st_size > 0]
        if growing:
            break
        assert proc.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return growing[0]


@pytest.mark.parametrize("fmt,suffix", [("torch", ".pt"), ("safetensors", ".safetensors")])
def test_kill_9_mid_write_leaves_no_torn_output_and_the_leftover_goes(tmp_path, fmt, suffix):
    folder = tmp_path / "data"
    folder.mkdir()
    leftover = _kill_while_writing(fmt, folder)
    assert not (folder / f"sparsified{suffix}").exists()  # never a torn file under the name
    assert leftover.name.startswith(".")  # hidden beside it, recognisable
    assert remove_leftovers(tmp_path) == [leftover]
    assert list(folder.iterdir()) == []


def test_a_failed_write_removes_its_partial_and_names_the_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    target = tmp_path / "out.pt"
    with pytest.raises(OSError) as err:
        atomic_save({"w": torch.ones(3), "x": Unpicklable()}, target)
    assert err.value.filename == str(target)  # the message names the file
    assert not target.exists() and not partial_path(target).exists()


def test_sync_removes_what_a_killed_job_left(store, tmp_path, cli):
    from sparsify_exp.runner.tracking.sync import sync

    job = tmp_path / "job"
    done = cli(["eval=[]", "schedule=linear", "schedule.steps=3", f"hydra.run.dir={job}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    stray = [
        job / "artifacts" / "data" / ".sparsified.safetensors.partial",
        job / "artifacts" / "data" / ".tmpAbC123",  # safetensors' own temporary name
        job / ".checkpoint.pt.partial",
    ]
    for p in stray:
        p.write_bytes(b"torn")
    lines: list[str] = []
    assert sync(job, out=lines.append, clean=True) == 0
    assert not any(p.exists() for p in stray)
    assert sum("partial file of a stopped job" in line for line in lines) == 3
    assert (job / "artifacts" / "data" / "sparsified.safetensors").is_file()  # kept
