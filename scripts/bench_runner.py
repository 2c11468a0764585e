"""Benchmarks of the runner (run by hand: ``python scripts/bench_runner.py``).

1. The card command ``python -m sparsify_exp sparsifier=first_row data=embeddings`` end to end
   (warm store: an already-migrated ``mlflow.db``; and once on a fresh store, which adds
   MLflow's schema migrations), against the cost of ``import torch, mlflow`` alone and of
   ``import hydra`` + composing the config. Medians of ``--repeat`` runs, each in a fresh
   process.
2. Logging 1,000 names x 10 steps through :class:`sparsify_exp.runner.tracking.store.RunTracker`
   (``log_batch``), in ms per metric, next to MLflow's one-call-per-metric ``log_metric``.

The numbers depend on the machine and its load; they are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CARD = ["sparsifier=first_row", "data=embeddings"]


def _wall(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall


def bench_card(repeat: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    py = sys.executable
    commands = {
        "import": [py, "-c", "import torch, mlflow"],
        "compose": [
            py,
            "-c",
            "import torch, mlflow; from sparsify_exp.runner import compose_config; "
            "from sparsify_exp.runner.validate import validate; "
            f"validate(compose_config({CARD!r}))",
        ],
        "card": [py, "-m", "sparsify_exp", *CARD],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    times["import_only"] = []  # in-process: the imports without the interpreter's teardown
    probe = [
        py,
        "-c",
        "import time; t=time.perf_counter(); import torch, mlflow; print(time.perf_counter()-t)",
    ]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        cold = _wall(commands["card"], root, env)  # fresh store: MLflow's schema migrations
        for _ in range(repeat):  # interleaved, so a busy neighbour slows all three alike
            for key, cmd in commands.items():
                times[key].append(_wall(cmd, root, env))
            out = subprocess.run(probe, cwd=root, env=env, capture_output=True, text=True)
            times["import_only"].append(float(out.stdout.strip().splitlines()[-1]))
        shutil.rmtree(root / "outputs", ignore_errors=True)
    for stat in (min, statistics.median):
        imp, comp, card = (stat(times[k]) for k in ("import", "compose", "card"))
        print(f"card command ({' '.join(CARD)}), {stat.__name__} of {repeat}:")
        print(f"  import torch, mlflow                         {imp:6.2f} s")
        print(f"  + import runner, hydra compose + validate    {comp - imp:6.2f} s")
        print(f"  + the run (store, data, masks, PNGs, writes) {card - comp:6.2f} s")
        print(f"  = card command, warm store                   {card:6.2f} s")
        print(
            f"  (import torch, mlflow in-process: {stat(times['import_only']):.2f} s; the rest of"
            " a bare import's wall time is interpreter teardown, which the CLI skips)"
        )
    print(f"  runs: {_fmt(times['card'])}")
    print(f"card command, fresh store (+ MLflow's schema migrations): {cold:.2f} s")


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def bench_logging(names: int, steps: int) -> None:
    from mlflow.tracking import MlflowClient

    from sparsify_exp.runner.tracking.store import RunTracker, ensure_experiment

    with tempfile.TemporaryDirectory() as d:
        client = MlflowClient(tracking_uri=f"sqlite:///{d}/mlflow.db")
        exp = ensure_experiment(client, "bench")
        tracker = RunTracker.start(client, exp, "batched", {})
        keys = [f"sparsity/layer{i}.weight" for i in range(names)]
        t = time.perf_counter()
        for step in range(steps):
            tracker.log_metrics({k: step / steps for k in keys}, step=step)
            tracker.flush()  # worst case: one log_batch per step (the runner flushes less)
        batched = time.perf_counter() - t
        tracker.finish()
        n = names * steps
        got = len(client.get_metric_history(tracker.run_id, keys[-1]))
        assert got == steps, got

        run = client.create_run(exp, run_name="one-call-per-metric")
        single_n = 200
        t = time.perf_counter()
        for i in range(single_n):
            client.log_metric(run.info.run_id, keys[i % names], 0.5, step=i // names)
        single = time.perf_counter() - t
    print(f"logging {names} names x {steps} steps = {n} metrics (sqlite):")
    print(f"  RunTracker (log_batch a step)     {batched * 1e3 / n:6.3f} ms a metric")
    print(f"  client.log_metric, one a call     {single * 1e3 / single_n:6.3f} ms a metric")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-card", action="store_true")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    if not args.skip_card:
        bench_card(args.repeat)
    bench_logging(args.names, args.steps)


if __name__ == "__main__":
    main()
