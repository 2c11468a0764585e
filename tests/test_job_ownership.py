"""One process at a time owns a job folder (a second resume is a one-line config error naming
the first), and a sweep's parent run keeps a heartbeat, so a killed sweep's parent does not
stay RUNNING forever."""

from __future__ import annotations

import json
import signal
import time

from sparsify_exp.runner import run_overrides
from sparsify_exp.runner.context import JOB_LOCK

SHORT = ["eval=[]", "checkpoint.every=1", "schedule=linear", "schedule.steps=4"]
SHORT += ["mlflow.mask_images=0"]


def _wait_for(predicate, proc, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"{what}: exited\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _holder(job) -> dict:
    try:
        return json.loads((job / JOB_LOCK).read_text())
    except (OSError, ValueError):
        return {}


def test_a_second_resume_of_a_run_being_resumed_is_one_line_naming_the_first(
    store, tmp_path, started_cli
):
    job = tmp_path / "job"
    run_id = run_overrides(SHORT, output_dir=job)
    store.client.set_terminated(run_id, "FAILED")  # as if it had been stopped
    first = started_cli([f"resume={run_id}"], store.dir)
    _wait_for(lambda: _holder(job).get("pid") == first.pid, first, "the first resume's claim")
    first.send_signal(signal.SIGSTOP)  # it holds the folder for as long as the test needs
    try:
        second = started_cli([f"resume={job}"], store.dir)
        _, err = second.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if "is in use" in line]
    assert len(lines) == 1 and "Traceback" not in err and "FileExistsError" not in err
    assert f"resuming in process {first.pid} on " in lines[0]
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert store.client.get_run(run_id).info.status == "FINISHED"


def test_a_killed_sweeps_parent_is_marked_failed_by_the_next_start(store, started_cli, cli):
    beat = ["mlflow.heartbeat_s=0.5", "mlflow.heartbeat_stale_s=3", "mlflow.mask_images=0"]
    args = ["-m", *beat, "eval=[]", "schedule.steps=400", "seed=1,2,3"]
    sweep = started_cli([*args, "data.tensors=[{name:w,shape:[64,64]}]"], store.dir)

    def parent_and_child():
        runs = store.runs()
        return any("mlflow.parentRunId" in r.data.tags for r in runs)

    _wait_for(parent_and_child, sweep, "the sweep's first job")
    sweep.send_signal(signal.SIGKILL)  # no chance to end anything
    sweep.wait()
    (parent,) = [r for r in store.runs() if r.data.tags.get("sparsify.sweep") == "true"]
    assert parent.info.status == "RUNNING"
    assert "sparsify.heartbeat" in parent.data.tags
    time.sleep(4)  # its heartbeat goes stale
    done = cli([*beat, "eval=[]", "schedule.steps=1"], store.dir)
    assert done.returncode == 0, done.stderr[-2000:]
    parent = store.client.get_run(parent.info.run_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["sparsify.failure"].startswith("process died (last heartbeat ")


def test_resume_of_a_memory_mapped_run_restores_its_masks_without_writing_the_map(
    store, tmp_path, cli
):
    """Restoring the checkpoint's data into the read-only mapping was a segfault (exit -11)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from sparsify_exp import load_masks

    source = tmp_path / "model.safetensors"
    save_file({"a.w": torch.randn(64, 32), "b.w": torch.randn(40, 16)}, str(source))
    before = source.read_bytes()
    args = ["data=file", f"data.path={source}", "data.mmap=true", "sparsifier=magnitude"]
    args += ["checkpoint.every=1", "schedule=linear", "schedule.steps=4", "eval=[]"]
    args += ["mlflow.mask_images=0"]
    job = tmp_path / "job"
    run_id = run_overrides(args, output_dir=job)
    final = job / "artifacts" / "masks" / "final.safetensors"
    shutil.copy(final, tmp_path / "uninterrupted.safetensors")
    final.unlink()
    store.client.set_terminated(run_id, "FAILED")  # as if it had been killed at step 3
    torn = job / "artifacts" / "data" / ".sparsified.safetensors.partial"
    torn.write_bytes(b"what a killed write left")
    done = cli([f"resume={job}"], store.dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 3 of 4" in done.stderr + done.stdout
    a, b = load_masks(final), load_masks(tmp_path / "uninterrupted.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert source.read_bytes() == before  # the input was never written
    assert not torn.exists()  # the resume removed the killed write's leftover
    state = torch.load(job / "checkpoint.pt", weights_only=True)
    assert state["data"] is None  # the mapped data is not copied into checkpoints
