"""The same sweep on each launcher, side by side: Hydra's basic launcher (one job after the
other, in-process), joblib (worker processes), submitit_local (one process per job, Slurm's
code path) and Ray (tasks on a one-node cluster on loopback, joined by address).

    .venv/bin/python scripts/bench_launchers.py [--jobs 8] [--steps 10] [--side 2048] [--cpus 2]

Prints a markdown table (the one in docs/runner.md, "Sweeps on a cluster"):

* wall: the whole ``python -m sparsify_exp -m ...`` command;
* first job: from the command's start to the first job's MLflow run start;
* job run: the mean of the jobs' own run times (MLflow start to end; jobs that share cores
  take longer);
* overhead/job: ``(wall - sum(job runs) / at once) / jobs``, the time the launcher adds,
  spread over the jobs: starting and importing, handing out work, collecting results.

Each launcher gets a fresh sqlite store; Ray's head node is started before its sweep (its
start-up is printed, not counted).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from services import RAY_LOOPBACK_ENV, ray_head  # noqa: E402


def sweep_args(jobs: int, steps: int, side: int) -> list[str]:
    levels = ",".join(f"{(i + 1) / (jobs + 1):.3f}" for i in range(jobs))
    return [
        "data=tensors",
        f"data.tensors=[{{name: w, shape: [{side}, {side}]}}]",
        "schedule=constant",
        f"schedule.steps={steps}",
        "mlflow.mask_images=0",
        "output.progress=none",
        f"sparsifier.sparsity_level={levels}",
    ]


def run(name: str, launcher: list[str], at_once: int, args: list[str], template: Path) -> dict:
    """Runs the sweep in a fresh folder and store; returns its row of the table."""
    from mlflow.tracking import MlflowClient

    from sparsify_exp.runner.tracking.store import find_sweep_runs, find_sweeps

    work = Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
    shutil.copy(template, work / "mlflow.db")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSIFY_EXP_")}
    env.update(MLFLOW_TRACKING_URI=uri, **RAY_LOOPBACK_ENV)
    start_ms = time.time() * 1000
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sparsify_exp", "-m", *launcher, *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: sweep failed\n{(proc.stdout + proc.stderr)[-3000:]}")
    client = MlflowClient(tracking_uri=uri)
    (parent,) = find_sweeps(client, "sparsify_exp")
    _, children = find_sweep_runs(client, parent.info.run_id)
    runs = [(c.info.end_time - c.info.start_time) / 1000 for c in children]
    first = (min(c.info.start_time for c in children) - start_ms) / 1000
    shutil.rmtree(work, ignore_errors=True)
    return {
        "launcher": name,
        "at once": at_once,
        "wall (s)": wall,
        "first job (s)": first,
        "job run (s)": sum(runs) / len(runs),
        "overhead/job (s)": (wall - sum(runs) / at_once) / len(runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--side", type=int, default=2048, help="the swept tensor is side x side")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="Ray's CPUs")
    ns = parser.parse_args()
    from mlflow.tracking import MlflowClient

    args = sweep_args(ns.jobs, ns.steps, ns.side)
    template = Path(tempfile.mkdtemp(prefix="bench_store_")) / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()  # migrate once
    rows = [
        run("basic", [], 1, args, template),
        run(
            "joblib",
            ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={ns.cpus}"],
            ns.cpus,
            args,
            template,
        ),
        run("submitit_local", ["hydra/launcher=submitit_local"], ns.jobs, args, template),
    ]
    log = Path(tempfile.mkdtemp(prefix="bench_ray_")) / "ray.log"
    t0 = time.perf_counter()
    with ray_head(log, num_cpus=ns.cpus) as head:
        ray_start = time.perf_counter() - t0
        launcher = ["hydra/launcher=ray", f"hydra.launcher.address={head.address}"]
        rows.append(run("ray", launcher, ns.cpus, args, template))
    shutil.rmtree(log.parent, ignore_errors=True)
    shutil.rmtree(template.parent, ignore_errors=True)

    what = f"data_norm on one {ns.side} x {ns.side} tensor, {ns.steps} steps"
    print(f"{ns.jobs} jobs ({what}), {os.cpu_count()} cores")
    print(f"(ray start --head: {ray_start:.1f} s, not counted)\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "|".join("---" if k == "launcher" else "---:" for k in keys) + "|")
    for row in rows:
        cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
