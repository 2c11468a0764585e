"""resume=: a run killed with kill -9 goes on from its checkpoint to the same masks."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from sparsify_exp import load_masks
from sparsify_exp.runner import compose_config, run_overrides
from sparsify_exp.runner.validate import validate

TRAINING = [
    "data=digits_mlp",
    "train=digits",
    "train.steps_per_step=40",
    "schedule=cubic",
    "schedule.steps=8",
    "sparsifier.sparsity_level=0.9",
    "checkpoint.every=1",
    "eval=[digits_accuracy]",
    "eval.every=1",
    "mlflow.mask_images=0",
]


def _history(store, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in store.client.get_metric_history(run_id, key)}


def _steps(store, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in store.client.get_metric_history(run_id, key))


def _final_masks(run) -> dict[str, torch.Tensor]:
    return load_masks(Path(run.data.tags["sparsify.job_dir"]) / "artifacts/masks/final.safetensors")


def test_kill_9_mid_training_then_resume_gives_the_uninterrupted_masks(store, started_cli):
    proc = started_cli(TRAINING, store.dir)
    deadline = time.monotonic() + 120
    while True:  # until two steps are in the store (and so in a checkpoint)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run never reached step 2"
        runs = store.runs()
        if runs and len(_steps(store, runs[0].info.run_id, "sparsity/overall")) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to say anything
    proc.wait()
    (killed,) = store.runs()
    run_id = killed.info.run_id
    assert killed.info.status == "RUNNING"
    assert len(_steps(store, run_id, "sparsity/overall")) < 8

    resumed = started_cli([f"resume={run_id}"], store.dir)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    uninterrupted = started_cli(TRAINING, store.dir)
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-2000:]

    runs = {r.info.run_id: r for r in store.runs()}
    assert len(runs) == 2  # the resumed run went on in the same MLflow run
    done = runs.pop(run_id)
    (fresh,) = runs.values()
    assert done.info.status == "FINISHED"
    for key in ("sparsity/overall", "train/loss", "task/accuracy/sparse"):
        assert _steps(store, run_id, key) == list(range(8)), key  # none twice, none missing
        assert _history(store, run_id, key) == _history(store, fresh.info.run_id, key), key
    a, b = _final_masks(done), _final_masks(fresh)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)  # bit-identical


_ENDED_AT: list[int] = []


def train_logs_then_ends_once(ctx, lr: float = 0.0) -> dict[str, float]:
    """Logs its own metric, then (the first time at step 2) ends the process's work before
    the step's sparsity is logged, as a kill between the two would."""
    ctx.log({"seen": float(ctx.step)})
    if ctx.step == 2 and not _ENDED_AT:
        _ENDED_AT.append(ctx.step)
        raise ValueError("ended between train/seen and sparsity/overall")
    return {"loss": 1.0 / (1 + ctx.step)}


def test_a_run_ended_between_two_metrics_of_a_step_logs_each_once_after_resume(store, tmp_path):
    _ENDED_AT.clear()
    args = ["train=digits", f"train.fn._target_={__name__}.train_logs_then_ends_once"]
    args += ["schedule=linear", "schedule.steps=4", "checkpoint.every=1", "eval=[]"]
    args += ["mlflow.mask_images=0"]
    with pytest.raises(RuntimeError, match="ended between"):
        run_overrides(args, output_dir=tmp_path / "job")
    (run,) = store.runs()
    run_id = run.info.run_id
    assert _steps(store, run_id, "train/seen") == [0, 1, 2]  # step 2's first metric is there
    assert _steps(store, run_id, "sparsity/overall") == [0, 1]  # its sparsity is not

    assert run_overrides([f"resume={tmp_path / 'job'}"]) == run_id
    for key in ("train/seen", "train/loss", "sparsity/overall"):
        assert _steps(store, run_id, key) == [0, 1, 2, 3], key  # none twice, none missing
    assert store.client.get_run(run_id).info.status == "FINISHED"


def test_resume_mistakes_are_one_line(store, tmp_path):
    (problem,) = validate(compose_config(["resume=0123456789abcdef"]))
    assert problem.startswith("resume=0123456789abcdef: no such run or job folder")
    (problem,) = validate(compose_config([f"resume={tmp_path}"]))
    assert problem == f"resume={tmp_path}: {tmp_path} is not a job folder (no mlflow_run.json)"


@pytest.mark.parametrize("every", ["-1", "x"])
def test_checkpoint_every_must_be_a_count(every):
    (problem,) = validate(compose_config([f"checkpoint.every={every}"]))
    assert problem.startswith(f"checkpoint.every={every}: must be")


def test_a_finished_run_or_a_changed_config_cannot_be_resumed(store, tmp_path, started_cli):
    run_id = run_overrides(
        ["eval=[]", "checkpoint.every=1", "schedule=linear", "schedule.steps=3"],
        output_dir=tmp_path / "job",
    )
    (problem,) = validate(compose_config([f"resume={run_id}"]))
    assert problem == f"resume={run_id}: run {run_id} FINISHED; there is nothing to resume"
    store.client.set_terminated(run_id, "FAILED")
    changed = started_cli([f"resume={tmp_path / 'job'}", "schedule.steps=9"], store.dir)
    _, err = changed.communicate(timeout=120)
    assert changed.returncode == 2  # the CLI: one line, before anything runs
    assert "schedule.steps=9 differs from the run's schedule.steps=3" in err
